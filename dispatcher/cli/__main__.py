"""``python -m dispatcher.cli``."""

import sys

from dispatcher.cli import main

sys.exit(main())
