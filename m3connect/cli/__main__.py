"""``python -m m3connect.cli`` runs the command line (same as the ``m3connect`` script)."""

import sys

from . import main

sys.exit(main())
