"""``python -m emlib.train``: the command line of :mod:`emlib.train`."""

from emlib.train import main

main()
