"""``python -m suite.cli``: the ``spdbench`` command."""

import sys

from suite.cli import main

sys.exit(main())
