"""Content hashes: of configs (checkpoint fingerprints), of files and folders, of one large file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (config, input hashes, code version)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_files(paths: list[Path]) -> str:
    """Content hash of files (and of every file under folders), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path.parent) if path.is_dir() else file.name).encode())
            with file.open("rb") as fh:
                while block := fh.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in chunks (checkpoints are several GB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
