"""``python -m olmopt``: the ``olmopt`` command."""

import sys

from olmopt.cli import main

sys.exit(main())
