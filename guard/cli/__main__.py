"""``python -m guard.cli``: the same as the ``guard`` console script."""

import sys

from guard.cli.main import main

sys.exit(main())
