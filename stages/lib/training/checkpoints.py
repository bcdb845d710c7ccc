"""Training checkpoints that survive kill -9: atomic folders, a config fingerprint, at most K kept."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

DONE_MARKER = "complete.json"


def _to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to the CPU (nested dicts, lists and tuples kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


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
        thread; one write at a time, in order. :meth:`wait` returns once everything handed over is on disk."""
        snapshot = CheckpointState(state.step, _to_cpu(state.tensors), _to_cpu(state.optimizer),
                                   _to_cpu(state.lr_scheduler), state.extra)  # fmt: skip
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        future = self._writer.submit(self.save, snapshot)
        self._pending.append(future)
        return future

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
