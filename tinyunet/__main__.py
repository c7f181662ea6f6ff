"""``python -m tinyunet`` runs the command line (see tinyunet.cli)."""

import sys

from .cli import main

sys.exit(main())
