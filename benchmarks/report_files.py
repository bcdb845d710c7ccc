"""What benchmarks share about their result files: ``--out`` (write the JSON), ``--table`` (print a JSON's
Markdown table and stop), the commit a result is recorded against."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

COMMIT_ENV = "SDPIPE_GIT_COMMIT"


def source_commit() -> str:
    """The commit the benchmarked tree is at: ``$SDPIPE_GIT_COMMIT`` where set (a copy of the tree on another
    machine may carry stale git metadata), else ``git rev-parse HEAD``."""
    from stages.lib.tracking.mlflow_run import git_commit

    return os.environ.get(COMMIT_ENV) or git_commit()


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
