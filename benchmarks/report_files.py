"""The result-file options every benchmark shares: ``--out`` (write the JSON) and ``--table`` (print a JSON's
Markdown table and stop)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out JSON`` and ``--table JSON``."""
    parser.add_argument("--out", type=Path, help="result JSON")
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the Markdown table of a result JSON"
    )


def printed_table(args: argparse.Namespace, markdown_table: Callable[[dict], str]) -> bool:
    """Print ``markdown_table`` of ``args.table``'s JSON if given; whether it was."""
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
    return bool(args.table)


def write_report(path: Path | None, report: dict) -> None:
    """Write ``report`` as indented JSON to ``path`` (its folder created), if given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
