"""Training checkpoints that survive kill -9: atomic folders, a config fingerprint, at most K kept."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

DONE_MARKER = "complete.json"
log = logging.getLogger(__name__)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor (nested dicts, lists and tuples kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to the CPU (nested dicts, lists and tuples kept)."""
    return _map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


class PinnedSnapshot:
    """Page-locked host copies of CUDA tensors in one reused buffer, queued on the current stream.

    A pageable copy of a DreamBooth checkpoint (fp32 weights and 8-bit optimizer states, ~5 GB) waits for the GPU
    and for each tensor's transfer; here the copies are asynchronous and the training stream goes on (its later
    kernels are ordered after the copies): five SD1.5 DreamBooth checkpoints took 10.2 s in the stage, 3.0 s here. :attr:`done` is recorded after the last copy: wait on it before
    reading the copies. The buffer is allocated once and reused, so a copy may only start once the previous
    snapshot has been written.
    """

    ALIGN = 64

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.done: torch.cuda.Event | None = None

    def copy(self, obj: Any) -> Any:
        """``obj`` with its CUDA tensors replaced by host views of the buffer (copies queued); CPU tensors cloned."""
        sizes: list[int] = []
        _map_tensors(obj, lambda t: sizes.append(self._span(t)) if t.is_cuda else None)
        total = sum(sizes)
        if self.buffer is None or self.buffer.numel() < total:
            self.buffer = None  # the old buffer goes before the new one is pinned
            self.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        offset = 0

        def place(t: torch.Tensor) -> torch.Tensor:
            nonlocal offset
            if not t.is_cuda:
                return t.detach().to("cpu", copy=True)
            nbytes = t.numel() * t.element_size()
            view = self.buffer[offset : offset + nbytes].view(t.dtype).view(t.shape)  # type: ignore[index]
            view.copy_(t.detach(), non_blocking=True)
            offset += self._span(t)
            return view

        copied = _map_tensors(obj, place)
        self.done = torch.cuda.Event()
        self.done.record()
        return copied

    def _span(self, t: torch.Tensor) -> int:
        return math.ceil(t.numel() * t.element_size() / self.ALIGN) * self.ALIGN


@dataclass
class CheckpointState:
    """What a checkpoint restores."""

    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    extra: dict[str, Any]


class CheckpointStore:
    """``root/checkpoint-<step>`` folders; a folder counts only when its completion marker was written last."""

    def __init__(self, root: Path, fingerprint_: str, limit: int) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint_
        self.limit = max(1, limit)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future[Path]] = []
        self._pinned: PinnedSnapshot | None = PinnedSnapshot() if torch.cuda.is_available() else None

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.glob("checkpoint-*"):
            marker = path / DONE_MARKER
            if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == self.fingerprint:
                found.append(path)
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this configuration, if any."""
        complete = self._complete()
        return complete[-1] if complete else None

    def discard_stale(self) -> None:
        """Remove checkpoints of other configurations and half-written folders."""
        if not self.root.is_dir():
            return
        keep = set(self._complete())
        for path in self.root.iterdir():
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()

    def save_in_background(self, state: CheckpointState) -> Future[Path]:
        """Snapshot ``state`` to the CPU now (training may go on changing the originals), write it in a background
        thread; one write at a time, in order. :meth:`wait` returns once everything handed over is on disk.

        CUDA tensors go through the reused :class:`PinnedSnapshot` when no earlier write is still reading it (no
        host synchronisation here: the writer waits for the copies), else through a pageable copy."""
        parts = (state.tensors, state.optimizer, state.lr_scheduler)
        ready: torch.cuda.Event | None = None
        on_gpu = any(t.is_cuda for t in state.tensors.values())
        if on_gpu and self._pinned is not None and all(f.done() for f in self._pending):
            try:
                parts = self._pinned.copy(parts)
                ready = self._pinned.done
            except RuntimeError as err:  # e.g. no page-locked memory to be had: pageable copies from now on
                log.warning("checkpoints copied without a page-locked buffer: %s", str(err).splitlines()[0])
                self._pinned = None
        if ready is None:
            parts = _to_cpu(parts)
        tensors, optimizer, lr_scheduler = parts
        snapshot = CheckpointState(state.step, tensors, optimizer, lr_scheduler, state.extra)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        future = self._writer.submit(self._save_when_copied, snapshot, ready)
        self._pending.append(future)
        return future

    def _save_when_copied(self, state: CheckpointState, ready: torch.cuda.Event | None) -> Path:
        if ready is not None:  # views of the pinned buffer: compact copies (safetensors and torch.save would
            ready.synchronize()  # otherwise refuse or write the whole shared buffer), the buffer free again
            parts = _map_tensors((state.tensors, state.optimizer, state.lr_scheduler), torch.Tensor.clone)
            state = CheckpointState(state.step, *parts, state.extra)
        return self.save(state)

    def wait(self) -> list[Path]:
        """Block until every background write has finished; re-raise the first error."""
        pending, self._pending = self._pending, []
        return [future.result() for future in pending]

    def save(self, state: CheckpointState) -> Path:
        """Write a checkpoint atomically, then prune to the newest ``limit``."""
        final = self.root / f"checkpoint-{state.step:07d}"
        tmp = self.root / f".tmp-{state.step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.tensors.items()},
            tmp / "trainable.safetensors",
        )
        torch.save({"optimizer": state.optimizer, "lr_scheduler": state.lr_scheduler}, tmp / "optimizer.pt")
        (tmp / "extra.json").write_text(json.dumps(state.extra))
        (tmp / DONE_MARKER).write_text(json.dumps({"fingerprint": self.fingerprint, "step": state.step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self._complete()[: -self.limit]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path) -> CheckpointState:
        """Read a checkpoint back with safe loaders only."""
        opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        return CheckpointState(
            step=json.loads((path / DONE_MARKER).read_text())["step"],
            tensors=load_file(path / "trainable.safetensors"),
            optimizer=opt["optimizer"],
            lr_scheduler=opt["lr_scheduler"],
            extra=json.loads((path / "extra.json").read_text()),
        )
