"""``python -m gradguard``: the same CLI as the ``gradguard`` console script."""

import sys

from gradguard.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
