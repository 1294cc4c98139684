"""``python -m emlib.data``: the command line of :mod:`emlib.data`."""

import sys

from emlib.data import main

sys.exit(main())
