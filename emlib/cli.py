"""Running an emlib command line: a user's mistake is one line on stderr with the fix, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(main: Callable[[list[str] | None], object], prog: str, argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; a user error (a bad config or data file, a missing file, an unknown name, a model that
    is not available) prints ``<prog>: error: <message>`` and exits with status 2. A bug still shows its traceback."""
    import yaml

    try:
        status = main(argv)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # e.g. ModelNotAvailableError: a hub id that is neither cached nor reachable
        if type(err).__name__ != "ModelNotAvailableError":
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if isinstance(status, int):
        sys.exit(status)
