"""Write the option tables of docs/*.md from the option specs; with --check, only list stale ones.

A table lives between ``<!-- options:NAME -->`` and ``<!-- /options:NAME -->``, where NAME is
``common`` or a backend's registry name (see fedtransport/options.py). tests/test_options.py
fails while a table differs from its spec: run this after changing an option.

    .venv/bin/python scripts/option_docs.py            # rewrite the tables
    .venv/bin/python scripts/option_docs.py --check    # exit 1 and name the stale tables
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtransport.options import doc_tables

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is stale")
    parser.add_argument("--docs", type=Path, default=DOCS, help=f"the docs directory (default {DOCS})")
    args = parser.parse_args(argv)
    stale = doc_tables(sorted(args.docs.glob("*.md")), write=not args.check)
    for where in stale:
        print(f"{'stale' if args.check else 'rewritten'}: {where}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
