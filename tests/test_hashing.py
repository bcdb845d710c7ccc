"""stages/lib/runtime/hashing.py: the parallel chunked content hash sees every byte, name and boundary."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from stages.lib.runtime import hashing
from stages.lib.runtime.hashing import file_sha256, hash_files


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(hashing, "HASH_CHUNK", 1024)  # many chunks from small files
    return 1024


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_every_byte_name_and_boundary_counts(tmp_path: Path, small_chunks: int) -> None:
    data = bytes(range(256)) * 40  # 10 KiB: 10 chunks
    base = hash_files([_folder(tmp_path / "a" / "m", {"w.bin": data, "empty": b"", "sub/c.json": b"{}"})])
    assert (
        hash_files([_folder(tmp_path / "b" / "m", {"w.bin": data, "empty": b"", "sub/c.json": b"{}"})])
        == base
    )
    changed = bytearray(data)
    changed[7 * small_chunks + 3] ^= 1  # one bit in the eighth chunk
    variants = {
        "one bit": {"w.bin": bytes(changed), "empty": b"", "sub/c.json": b"{}"},
        "one byte more": {"w.bin": data + b"\0", "empty": b"", "sub/c.json": b"{}"},
        "a renamed file": {"x.bin": data, "empty": b"", "sub/c.json": b"{}"},
        "bytes moved across files": {"w.bin": data[:-1], "empty": data[-1:], "sub/c.json": b"{}"},
    }
    for i, (case, files) in enumerate(variants.items()):
        assert hash_files([_folder(tmp_path / f"v{i}" / "m", files)]) != base, case


def test_chunking_is_invisible_to_a_single_chunk_file(tmp_path: Path, small_chunks: int) -> None:
    """A file below one chunk hashes as the SHA-256 of its name, size and that one chunk's digest."""
    file = tmp_path / "w.bin"
    file.write_bytes(b"abc")
    expected = hashlib.sha256(b"w.bin" + (3).to_bytes(8, "little") + hashlib.sha256(b"abc").digest())
    assert hash_files([file]) == expected.hexdigest()[:16]
    assert file_sha256(file) == hashlib.sha256(b"abc").hexdigest(), "file_sha256 stays the plain SHA-256"
