"""``python -m jpeft.cli`` is the same as the ``jpeft`` command."""

import sys

from jpeft.cli import process_main

if __name__ == "__main__":
    sys.exit(process_main())
