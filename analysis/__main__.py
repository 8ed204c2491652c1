"""``python -m analysis report RUN_DIR``: see analysis/cli.py."""

import sys

from .cli import main

sys.exit(main())
