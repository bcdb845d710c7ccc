"""Content hashes: of configs (checkpoint fingerprints), of files and folders, of one large file."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stages.lib.runtime.timings import phase

HASH_CHUNK = 1 << 26  # 64 MiB per hashed piece
HASH_THREADS = min(8, os.cpu_count() or 1)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (config, input hashes, code version)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _chunk_digest(view: memoryview, start: int) -> bytes:
    with view[start : start + HASH_CHUNK] as part:
        return hashlib.sha256(part).digest()


def _file_digests(file: Path, pool: ThreadPoolExecutor) -> list[bytes]:
    """SHA-256 of each ``HASH_CHUNK`` of ``file``, hashed in parallel from a read-only memory map (hashlib
    releases the GIL on large buffers; the pages come from the OS cache without a copy)."""
    size = file.stat().st_size
    if size == 0:
        return []
    with file.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            return list(pool.map(lambda start: _chunk_digest(view, start), range(0, size, HASH_CHUNK)))
        finally:
            view.release()


def hash_files(paths: list[Path]) -> str:
    """Content hash of files (and of every file under folders), in sorted order: each file's name, size and the
    SHA-256 of each of its 64 MiB chunks, chunks hashed on several threads (a 3.4 GB UNet: one chunk's time per
    thread instead of the whole file's)."""
    digest = hashlib.sha256()
    with (
        phase("fingerprint"),
        ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="hash") as pool,
    ):
        for path in sorted(paths):
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                digest.update(str(file.relative_to(path.parent) if path.is_dir() else file.name).encode())
                digest.update(file.stat().st_size.to_bytes(8, "little"))
                for chunk in _file_digests(file, pool):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in chunks (checkpoints are several GB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
