"""The UNet's sampling forward replayed as CUDA graphs: no kernel-launch overhead at small batches.

A validation round samples two images (four latents with classifier-free guidance) for 25 steps; at that size an
eager SD1.5 forward is bound by the host launching its ~1,500 kernels, not by the GPU. :class:`GraphedDenoiser`
captures the forward once per input signature (shapes, dtypes, autocast state) and replays it, copying each call's
inputs into the graph's static buffers. The captured kernels are the eager ones, so the outputs are the eager
outputs; the weights are read where they live, so training between two rounds is seen by the next replay.

Calls the graphs do not cover (extra tensors such as a ControlNet's residuals, gradients enabled, a CPU model) run
eagerly. Under autocast the captured forward casts the weights itself (no autocast cache), so a replay never reads
casts made from older weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from stages.lib.training.graphed_step import warm_up

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # before capture, on a side stream: cuDNN / cuBLAS choose and allocate their workspaces


class GraphedDenoiser:
    """``unet.forward`` for ``(sample, timestep, encoder_hidden_states)`` as replays of CUDA graphs, one per input
    signature, sharing one memory pool; anything else goes to the forward ``unet`` had.

    The first call of a signature runs that forward (its result is returned), then captures the class's forward
    under the caller's autocast state and replays it on the same inputs: a replay that differs from the eager
    result by more than ``tolerance`` (relative to its largest value) leaves the graphs off for good.
    """

    def __init__(self, unet: torch.nn.Module, max_graphs: int = 4, tolerance: float = 1e-3) -> None:
        self.eager = unet.forward  # the forward in use when sampling starts (may be Accelerate's wrapper)
        self.plain = type(unet).forward.__get__(unet, type(unet))
        self.max_graphs = max_graphs
        self.tolerance = tolerance
        self.graphs: dict[tuple, _Graph] = {}
        self.pool: Any = None
        self.failed: str | None = None

    def forward(
        self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args, **kwargs
    ):
        """What the pipeline calls in place of ``unet.forward``."""
        key = self._signature(sample, timestep, encoder_hidden_states, args, kwargs)
        entry = None if key is None else self.graphs.get(key)
        if entry is None:
            result = self.eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
            if key is not None and len(self.graphs) < self.max_graphs:
                self._capture(key, sample, timestep, encoder_hidden_states, _first(result))
            return result
        out = entry.replay(sample, timestep, encoder_hidden_states)
        return (out,) if kwargs.get("return_dict", True) is False else _unet_output(out)

    def _signature(self, sample, timestep, encoder_hidden_states, args, kwargs) -> tuple | None:
        """The graph key of a call the graphs cover, or None (eager)."""
        if self.failed is not None or args or torch.is_grad_enabled() or sample.device.type != "cuda":
            return None
        if not isinstance(timestep, torch.Tensor) or timestep.device != sample.device:
            return None
        if any(v is not None for k, v in kwargs.items() if k != "return_dict"):
            return None  # ControlNet residuals, cross-attention scales, added conditions: eager
        autocast = torch.is_autocast_enabled("cuda")
        return (
            tuple(sample.shape), sample.dtype, tuple(timestep.shape), timestep.dtype,
            tuple(encoder_hidden_states.shape), encoder_hidden_states.dtype,
            autocast, torch.get_autocast_dtype("cuda") if autocast else None,
        )  # fmt: skip

    def _capture(self, key: tuple, sample, timestep, encoder_hidden_states, reference: torch.Tensor) -> None:
        autocast, dtype = key[-2], key[-1]
        static = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        static = {name: value.clone() for name, value in static.items()}

        def run() -> torch.Tensor:
            # no autocast cache: the graph casts the weights itself at every replay
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=autocast, cache_enabled=False):
                return self.plain(**static, return_dict=False)[0]

        try:
            warm_up(run, WARMUP_CALLS)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread-local: the checkpoint writer's thread may wait on a CUDA event meanwhile (a resumed run's first
            # round can follow a checkpoint), which a global capture would forbid
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = run()
        except RuntimeError as err:  # an operation this torch/driver cannot capture: stay eager
            self._give_up(str(err).splitlines()[0])
            return
        entry = _Graph(graph, static, output, reference.dtype)
        replayed = entry.replay(sample, timestep, encoder_hidden_states)
        error = float(
            (replayed.float() - reference.float()).abs().max()
            / reference.float().abs().max().clamp_min(1e-12)
        )
        if not error <= self.tolerance:
            self._give_up(f"a replay differs from the eager forward by {error:.2g} of its largest value")
            return
        self.graphs[key] = entry
        log.info(
            "sampling UNet captured as a CUDA graph for %d latents (replay within %.1g of eager)",
            key[0][0],
            error,
        )

    def _give_up(self, reason: str) -> None:
        self.failed = reason
        self.release()
        log.warning("sampling UNet not captured as a CUDA graph (%s); sampling eagerly", reason)

    def release(self) -> None:
        """Drop the graphs and their memory pool."""
        self.graphs.clear()
        self.pool = None


class _Graph:
    """One captured forward: its static inputs and output, and the dtype the eager forward returns."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static: dict[str, torch.Tensor], output: torch.Tensor,
                 out_dtype: torch.dtype) -> None:  # fmt: skip
        self.graph, self.static, self.output, self.out_dtype = graph, static, output, out_dtype

    def replay(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        self.static["sample"].copy_(sample)
        self.static["timestep"].copy_(timestep)
        self.static["encoder_hidden_states"].copy_(encoder_hidden_states)
        self.graph.replay()
        return self.output.to(self.out_dtype, copy=True)  # the next replay overwrites the static output


def _first(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result.sample


def _unet_output(sample: torch.Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


@contextmanager
def graphed_sampling(unet: torch.nn.Module, denoiser: GraphedDenoiser | None) -> Iterator[None]:
    """Within the block, ``unet``'s calls go through ``denoiser`` (None: unchanged)."""
    if denoiser is None:
        yield
        return
    previous = unet.__dict__.get("forward")  # an instance-level wrapper (Accelerate's), if any
    denoiser.eager = unet.forward
    unet.forward = denoiser.forward
    try:
        yield
    finally:
        if previous is None:
            del unet.forward  # back to the class's forward
        else:
            unet.forward = previous
