"""``python -m snodevit``: the same command line as the ``snodevit`` console script (useful where the
package is on ``PYTHONPATH`` but not installed)."""

import sys

from snodevit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
