"""``python -m warmpod``."""

import sys

from warmpod.cli import main

sys.exit(main())
