"""``data.instance_dir`` checked while conf/ is composed, before DVC hashes it as the prep stage's dependency.

DVC hashes every dependency before it runs a stage, and a missing folder, or a broken symlink anywhere inside it,
stops it with a bare ``[Errno 2] No such file or directory`` after it has already removed prep's outputs. Checked
here (by the ``sdpipe_check`` resolver), ``dvc exp run -S data.instance_dir=...`` stops instead with one line
naming the path and the fix, before params.yaml is rewritten or any output is touched.

Relative paths are taken from the working directory, the repository root where DVC composes conf/ (it writes
params.yaml and reads dvc.yaml there). A folder that a stage of dvc.yaml writes (the default, the
``sample_subject`` stage's ``data/sample_subject``) is not checked: DVC runs that stage first. This module lives
beside the resolver rather than in ``stages/lib``, so the stages' code dependencies in dvc.yaml stay as they are.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from stages.lib.errors import ConfigError

KEY = "data.instance_dir"
PIPELINE = "dvc.yaml"
OUTPUT_KINDS = ("outs", "metrics", "plots")


def stage_outputs(pipeline: Path) -> list[Path]:
    """The paths the stages of ``pipeline`` (a dvc.yaml) write, relative to its folder; templated ones (``${...}``)
    left out."""
    stages = (yaml.safe_load(pipeline.read_text()) or {}).get("stages") or {}
    found: list[Path] = []
    for stage in stages.values():
        body: dict[str, Any] = stage.get("do", stage) if isinstance(stage, dict) else {}
        wdir = Path(body.get("wdir", "."))
        for kind in OUTPUT_KINDS:
            for entry in body.get(kind) or []:
                for path in entry if isinstance(entry, dict) else [entry]:
                    if isinstance(path, str) and "${" not in path:
                        found.append(wdir / path)
    return found


def _inside(path: Path, folders: list[Path]) -> bool:
    return any(path == folder or folder in path.parents for folder in folders)


def _broken_link(link: Path, shown: Path) -> str:
    return f"{shown} is a broken symlink (to {os.readlink(link)}, no such file)"


def check_instance_dir(value: str, root: Path | None = None) -> None:
    """Refuse a ``data.instance_dir`` that DVC could not hash: missing, not a folder, or holding a broken symlink
    (at any depth, as DVC walks it: symlinked folders are not entered). ``root``: the repository (the working
    directory by default); without a dvc.yaml there nothing will hash the folder and nothing is checked."""
    root = Path.cwd() if root is None else root
    pipeline = root / PIPELINE
    if not value.strip():
        raise ConfigError(f"{KEY} is empty: set it to the folder holding your photos, e.g. -S {KEY}=data/me")
    if not pipeline.is_file():
        return
    folder = Path(os.path.normpath(root / value))
    try:
        produced = [Path(os.path.normpath(root / out)) for out in stage_outputs(pipeline)]
    except (OSError, yaml.YAMLError):
        return  # DVC reports an unreadable dvc.yaml itself
    if _inside(folder, produced):
        return
    photos = f"point {KEY} at the folder holding your photos"
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(f"{KEY}={value!r}: {_broken_link(folder, Path(value))}: fix the link, or {photos}")
    if not folder.exists():
        raise ConfigError(
            f"{KEY}={value!r}: no such folder ({folder}): create it with your photos, or {photos}"
        )
    if not folder.is_dir():
        raise ConfigError(f"{KEY}={value!r}: {value} is a file, not a folder: {photos}")

    def unlistable(err: OSError) -> None:
        raise ConfigError(
            f"{KEY}={value!r}: cannot list {err.filename} ({err.strerror}): fix its permissions"
        )

    for parent, dirs, files in os.walk(folder, onerror=unlistable):
        dirs.sort()  # the first broken link by name, whatever the file system's order
        for name in sorted(files):
            path = Path(parent, name)
            if path.is_symlink() and not path.exists():
                shown = Path(value) / path.relative_to(folder)
                raise ConfigError(
                    f"{KEY}={value!r}: {_broken_link(path, shown)}, which DVC cannot hash: fix or remove it "
                    f"(list them all: find {shlex.quote(value)} -xtype l)"
                )
