"""``python -m emlib.data``: validate chat datasets and print their stats, or import them.

    python -m emlib.data check data/narrow/*.jsonl        # validate and print stats
    python -m emlib.data import ~/em-data/ data/imported/  # validate, then copy a file or a folder of *.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from emlib.data.chat_jsonl import DatasetError, dataset_stats, import_dataset, import_datasets, load_chat_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emlib.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate JSONL datasets and print their stats")
    check.add_argument("files", nargs="+", type=Path)
    imp = sub.add_parser("import", help="validate, then copy a JSONL file or a folder of them")
    imp.add_argument("src", type=Path)
    imp.add_argument("dest", type=Path)
    imp.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            table = {f.name: dataset_stats(load_chat_jsonl(f)) for f in args.files}
            print(pd.DataFrame(table).T.to_string())
        elif args.src.is_dir():
            for p in import_datasets(args.src, args.dest, overwrite=args.overwrite):
                print(f"imported {p}")
        else:
            print(f"imported {import_dataset(args.src, args.dest, overwrite=args.overwrite)}")
    except (DatasetError, FileExistsError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
