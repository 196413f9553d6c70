"""``python -m jpeft.cli`` is the same as the ``jpeft`` command."""

import sys

from jpeft.cli import main

if __name__ == "__main__":
    sys.exit(main())
