"""``python -m emlib.train``: the command line of :mod:`emlib.train` (see :mod:`emlib.train.cli`)."""

from emlib.train.cli import run

run()
