"""``python -m adamkit``: the same command as the ``adamkit`` console script."""

import sys

from adamkit.tools.cli import main

sys.exit(main())
