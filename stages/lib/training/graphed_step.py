"""The training step as one CUDA graph, fed without host synchronisation.

A DreamBooth step at SD1.5 size launches ~5,700 kernels; eagerly the GPU idles between them most of the time. Here
the whole step -- batch assembly from the step's random draws, forward under autocast, loss, backward, gradient
clipping, the flat 8-bit AdamW update and the non-finite guard -- is captured once and replayed each step:

- the step's random draws are made on the host from the same ``(seed, step)`` generator as the eager step (so both
  train on the same batches, and a resumed run draws what an uninterrupted one would), packed into one float vector
  per step, copied to the device in chunks of steps from pinned memory, and copied into the graph's static input
  before each replay (all asynchronous);
- the learning rate, the step count, the clip coefficient and the "a loss was non-finite" flag live on the device;
  once a loss is non-finite no later update is applied (the flag is sticky), and the host learns of it when it next
  reads the losses, every ``flush_every`` steps and before validation, checkpoints and the end;
- the losses of each step are copied into a device buffer and read back in one transfer per flush.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "instance_loss", "prior_loss")


@dataclass
class StepDraw:
    """The random draws of one training step (host or device tensors)."""

    instance_index: torch.Tensor  # (bs,) rows of the instance cache
    prior_index: torch.Tensor | None  # (bs,) rows of the class cache, with prior preservation
    latent_noise: list[torch.Tensor]  # per part (instance, prior): (bs, C, h, w) posterior sampling noise
    noise: torch.Tensor  # (rows, C, h, w) diffusion noise (offset noise included)
    timesteps: torch.Tensor  # (rows,)

    def to(self, device: torch.device) -> StepDraw:
        """The same draws on ``device``."""
        return StepDraw(
            self.instance_index.to(device),
            None if self.prior_index is None else self.prior_index.to(device),
            [n.to(device) for n in self.latent_noise],
            self.noise.to(device),
            self.timesteps.to(device),
        )

    def pack(self) -> torch.Tensor:
        """All draws as one float32 vector (indices and timesteps are small integers, exact in float32)."""
        parts = [self.instance_index] + ([self.prior_index] if self.prior_index is not None else [])
        parts += [*self.latent_noise, self.noise, self.timesteps]
        return torch.cat([p.reshape(-1).float() for p in parts])


def unpack(vector: torch.Tensor, like: StepDraw) -> StepDraw:
    """Views of ``vector`` (packed by :meth:`StepDraw.pack`) shaped like ``like``; integer parts as int64."""
    offset = 0

    def take(shape: torch.Size, integer: bool) -> torch.Tensor:
        nonlocal offset
        size = int(torch.Size(shape).numel())
        part = vector[offset : offset + size].view(shape)
        offset += size
        return part.long() if integer else part

    instance = take(like.instance_index.shape, True)
    prior = None if like.prior_index is None else take(like.prior_index.shape, True)
    latent_noise = [take(n.shape, False) for n in like.latent_noise]
    noise = take(like.noise.shape, False)
    timesteps = take(like.timesteps.shape, True)
    return StepDraw(instance, prior, latent_noise, noise, timesteps)


class DrawFeeder:
    """Puts each step's packed draws into one static device vector, without host synchronisation.

    Draws are made ``chunk`` steps at a time into one of two pinned host buffers and copied to one of two device
    buffers in one transfer; before a replay, that step's row is copied into ``static`` on the device. A pinned
    buffer is refilled only after the copy that last read it has finished (an event two chunks old).
    """

    def __init__(self, draw: Callable[[int], StepDraw], length: int, device: torch.device, chunk: int = 64):
        self.draw, self.chunk, self.device = draw, chunk, device
        self.host = [torch.empty(chunk, length, pin_memory=True) for _ in range(2)]
        self.dev = [torch.empty(chunk, length, device=device) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.static = torch.zeros(length, device=device)
        self.loaded: tuple[int, int] | None = None  # (first step, slot) of the chunk on the device

    def _load(self, first: int, slot: int) -> None:
        event = self.copied[slot]
        if event is not None:
            event.synchronize()  # the transfer that last read this pinned buffer is done
        for row in range(self.chunk):
            self.host[slot][row].copy_(self.draw(first + row).pack())
        self.dev[slot].copy_(self.host[slot], non_blocking=True)
        self.copied[slot] = torch.cuda.Event()
        self.copied[slot].record()
        self.loaded = (first, slot)

    def feed(self, step: int) -> None:
        """Copy ``step``'s draws into :attr:`static` (stream-ordered before the next replay)."""
        first = step - step % self.chunk
        if self.loaded is None or self.loaded[0] != first:
            slot = 0 if self.loaded is None else 1 - self.loaded[1]
            self._load(first, slot)
        self.static.copy_(self.dev[self.loaded[1]][step - first])  # type: ignore[index]


class LossLog:
    """Per-step loss vectors kept on the device and read back in one transfer."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.buffer = torch.zeros(capacity, len(LOSS_KEYS), device=device)
        self.steps: list[tuple[int, float]] = []  # (step number, lr after the step) of each filled row

    def add(self, losses: torch.Tensor, step: int, lr: float) -> None:
        self.buffer[len(self.steps)].copy_(losses)
        self.steps.append((step, lr))

    @property
    def full(self) -> bool:
        return len(self.steps) == self.buffer.shape[0]

    def drain(self, with_prior: bool) -> list[tuple[int, dict[str, float]]]:
        """``(step, record)`` of every filled row (one device-to-host copy), oldest first; empties the log."""
        if not self.steps:
            return []
        values = self.buffer[: len(self.steps)].cpu().tolist()
        keys = LOSS_KEYS if with_prior else LOSS_KEYS[:2]
        out = [
            (step, {**{k: v for k, v in zip(keys, row, strict=False)}, "lr": lr})
            for (step, lr), row in zip(self.steps, values, strict=True)
        ]
        self.steps = []
        return out


def warm_up(run: Callable[[], object], calls: int) -> None:
    """``run`` ``calls`` times on a side stream, as a CUDA graph capture needs first (kernels loaded, cuDNN and
    cuBLAS workspaces made outside the graph); the current stream then waits for it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            run()
    torch.cuda.current_stream().wait_stream(side)


class GraphedStep:
    """One training step captured as a CUDA graph and replayed (see the module docstring).

    ``draw(step)`` gives a step's random draws on the host; ``losses(draws)`` assembles the batch on the device
    and returns the loss terms (``loss``, ``instance_loss`` and, with prior preservation, ``prior_loss``);
    ``optimizer`` is a :class:`~stages.lib.training.flat_adamw8bit.FlatAdamW8bit` over the trained parameters.
    """

    def __init__(
        self,
        draw: Callable[[int], StepDraw],
        losses: Callable[[StepDraw], dict[str, torch.Tensor]],
        optimizer,
        max_grad_norm: float,
        first_step: int,
        device: torch.device,
        flush_every: int = 50,
    ) -> None:
        self.like = draw(first_step)
        self.feeder = DrawFeeder(draw, self.like.pack().numel(), device)
        self.losses, self.optimizer, self.max_grad_norm = losses, optimizer, max_grad_norm
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # sticky: a loss was non-finite
        self.apply = torch.zeros((), dtype=torch.bool, device=device)  # the captured step's skip input: never
        self.out = torch.full((len(LOSS_KEYS),), float("nan"), device=device)
        self.log = LossLog(flush_every, device)
        self.feeder.feed(first_step)  # a real batch in the static input for warm-up and capture
        self.graph = self._capture(device)

    def _body(self, skip: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        losses = self.losses(unpack(self.feeder.static, self.like))
        losses["loss"].backward()
        self.bad.logical_or_(~torch.isfinite(losses["loss"].detach()))
        scale = self.optimizer.clip_coefficient(self.max_grad_norm) if self.max_grad_norm > 0 else None
        self.optimizer.update(grad_scale=scale, skip=self.bad | skip)
        for i, key in enumerate(LOSS_KEYS):
            if key in losses:
                self.out[i].copy_(losses[key].detach())

    def _capture(self, device: torch.device) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream with every update skipped (kernels compiled, workspaces made), then capture."""
        skip = torch.ones((), dtype=torch.bool, device=device)
        warm_up(lambda: self._body(skip), calls=2)
        # The warm-up's activations sit freed in the allocator's cache; the capture allocates from the graph's own
        # pool, so hand them back first: otherwise both sets stay reserved and the step needs twice the memory.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self.bad.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            # A tensor made outside the capture and read inside it must live as long as the graph: the replay
            # reads its address, which the allocator would otherwise hand to the next tensor.
            self._body(self.apply)
        return graph

    def replayed_loss(self, step: int) -> float:
        """The loss the graph computes for ``step`` with the update held back (a self-check before training):
        the weights, the optimizer state and the step count stay as they are."""
        self.bad.fill_(True)  # the update of this replay is skipped
        self.feeder.feed(step)
        self.optimizer.sync_lr()
        self.graph.replay()
        loss = float(self.out[0])
        self.bad.fill_(False)
        return loss

    def step(self, step: int) -> None:
        """Train step ``step`` (0-based): its draws in, the learning rate in, one replay. No host synchronisation."""
        self.feeder.feed(step)
        self.optimizer.sync_lr()
        self.graph.replay()

    def record(self, done: int, lr: float) -> None:
        """Keep the losses of the step just replayed (``done`` = its 1-based number) on the device."""
        self.log.add(self.out, done, lr)

    @property
    def log_full(self) -> bool:
        return self.log.full

    def drain(self, with_prior: bool) -> list[tuple[int, dict[str, float]]]:
        """The recorded steps' losses, read back in one transfer."""
        return self.log.drain(with_prior)
