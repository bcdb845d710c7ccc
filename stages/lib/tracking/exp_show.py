"""`dvc exp show` narrowed to what tells experiments apart: the params that vary and the headline metrics.

Plain ``dvc exp show`` lists every key of every params section and every metric of every stage (hundreds of
columns). This runs it with ``--only-changed`` (params whose values differ between the experiments shown),
``--keep`` for the experiment's name, date and the headline metrics (``reports/compare/headline.json``), and
``--drop`` for every other column (other metrics, dependency hashes)::

    python -m stages.lib.tracking.exp_show [more dvc exp show options, e.g. -n 3 or --sort-by db_similarity]

The params come from ``params.yaml`` (every key, flattened as DVC names them); the headline metrics from the
headline file, or its default names when no experiment has written it yet.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")
HEADLINE_FILE = Path("reports/compare/headline.json")
HEADLINE_DEFAULT = ("db_similarity", "db_subject_rate", "lora_similarity", "lora_subject_rate")
ALWAYS = ("Experiment", "Created")


def flat_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    """Dotted names of the leaves of a params tree, as ``dvc exp show`` names its columns (lists are leaves)."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from flat_keys(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1]


def headline_names(path: Path = HEADLINE_FILE) -> list[str]:
    """The headline metrics' names: the file's keys, or the defaults before any run wrote it."""
    try:
        return sorted(json.loads(path.read_text()))
    except (OSError, ValueError):
        return list(HEADLINE_DEFAULT)


def exp_show_args(
    params: Sequence[str], headline: Sequence[str], headline_file: Path = HEADLINE_FILE
) -> list[str]:
    """The ``dvc exp show`` options: keep the name, date and headline columns (also when DVC prefixes a metric
    with its file because another file has the same name), drop everything that is neither kept nor a param."""
    metrics = "|".join(re.escape(name) for name in headline)
    keep = f"^(?:{'|'.join(ALWAYS)}|(?:{re.escape(str(headline_file))}:)?(?:{metrics}))$"
    drop = f"^(?!(?:{'|'.join(re.escape(name) for name in params)})$)"
    return ["--only-changed", "--keep", keep, "--drop", drop]


def command(argv: Sequence[str] = (), root: Path = Path()) -> list[str]:
    """The whole ``dvc exp show`` command line for the repository at ``root``."""
    params_file = root / PARAMS_FILE
    if not params_file.is_file():
        raise SystemExit(
            f"error: {params_file} not found: run this in the project folder (where dvc.yaml is)"
        )
    params = list(flat_keys(yaml.safe_load(params_file.read_text()) or {}))
    args = exp_show_args(params, headline_names(root / HEADLINE_FILE))
    beside = Path(sys.executable).with_name("dvc")  # the project's venv, also when it is not on the PATH
    return [str(beside) if beside.is_file() else "dvc", "exp", "show", *args, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    return subprocess.run(command(sys.argv[1:] if argv is None else argv)).returncode


if __name__ == "__main__":
    raise SystemExit(main())
