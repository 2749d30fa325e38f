"""``python -m flows.cli``: the ``fanaoi`` console script without the install."""

import sys

from flows.cli import main

sys.exit(main())
