"""``python -m jpeft.forgetting``: see :mod:`jpeft.forgetting.cli`."""

import sys

from jpeft.forgetting.cli import main

if __name__ == "__main__":
    sys.exit(main())
