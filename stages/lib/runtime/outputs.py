"""Write stage outputs atomically so that a failed run never destroys the previous result."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.lib.errors import StageError


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final``; on success it replaces ``final``, on error it is removed."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except PermissionError as err:
        raise StageError(
            f"cannot write {final}: {final.parent} is not writable ({err.strerror}); "
            f"make it writable (chmod -R u+rwX {final.parent}) and run again"
        ) from err
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
