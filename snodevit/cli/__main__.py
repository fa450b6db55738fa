"""``python -m snodevit.cli``: the ``snodevit`` command line."""

import sys

from snodevit.cli.main import main

sys.exit(main())
