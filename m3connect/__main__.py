"""``python -m m3connect`` runs the command line (same as the ``m3connect`` script)."""

import sys

from .cli import main

sys.exit(main())
