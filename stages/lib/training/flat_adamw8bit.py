"""8-bit AdamW over one flat parameter buffer, capturable into a CUDA graph; numerically bitsandbytes' AdamW8bit.

Design
------
* **One flat buffer.** ``FlatAdamW8bit`` copies every parameter into ``flat`` (fp32, 1-D) and rebinds ``p.data``
  to a view of it; ``flat_grad`` holds the gradients the same way (each ``p.grad`` is a view, so ``backward()``
  accumulates into it in place). Each parameter starts on a block boundary: blocks of ``block_size`` never
  straddle two tensors (as bitsandbytes' per-tensor blocks), and the zero pad after each tensor (and the total
  length) is a multiple of ``block_size``. The whole update is then one kernel over ``flat`` instead of one per
  tensor (bitsandbytes launches one per parameter tensor: 686 for the SD1.5 UNet).
* **Capturable.** ``update()`` reads everything that changes between steps from device tensors: the learning
  rate (``lr_tensor``, set by ``sync_lr()`` outside the graph), the step count (``step_count``, incremented on
  the device), a gradient scale (e.g. ``clip_coefficient()``) and a skip flag; it never synchronises with the
  host. On CUDA it is one Triton kernel plus up to three one-element ops (copy the scale, turn ``skip`` into a
  keep flag, add it to ``step_count``); ``zero_grad``, ``grad_norm`` and ``clip_coefficient`` are plain device
  ops. Hyper-parameters other than lr (betas, eps, weight decay) are read from ``param_groups`` when ``update``
  runs, so a captured graph keeps the values it was captured with. Where ``skip`` is true nothing changes
  (weights, 8-bit states, absmax, ``step_count`` all bit-identical).
* **Backends.** ``"triton"`` (``stages.lib.training.flat_adamw8bit_triton``, imported lazily: triton is not installed on
  CPU machines) and ``"torch"``, a vectorised reference over ``flat`` viewed as (blocks, block_size), processed
  in chunks of blocks to bound temporaries. ``"auto"`` picks triton on CUDA and torch elsewhere. Both compute
  the same fp32 expressions in the same order, and the same quantisation (the nearest code, ties as below).

bitsandbytes compatibility (0.50.2, ``csrc/kernels.cu`` ``kOptimizerStatic8bit2StateBlockwise`` and
``quantize_2D``; ``bitsandbytes/functional.py`` ``create_dynamic_map``; ``bitsandbytes/optim/optimizer.py``
``Optimizer2State``), matched:

* code books: state1 (exp_avg) with ``create_dynamic_map(signed=True)``, state2 (exp_avg_sq) with
  ``create_dynamic_map(signed=False)`` (``Optimizer8bit.fill_qmap``), recomputed here by the same fp32 formula
  (``dynamic_code_book``); states start as code 0 with absmax 0 (``init_state``: ``torch.zeros`` buffers);
  one fp32 absmax per block of 256 per state;
* the update, per element, in this order and fp32: ``g *= scale``; ``s2 = s2*b2 + ((1-b2)*g)*g``;
  ``s1 = s1*b1 + (1-b1)*g``; non-finite raw ``g``: ``s1 = s2 = 0`` and the weight untouched; new absmax =
  ``max|s|`` over the block; ``c1 = 1 - b1**t``, ``c2 = sqrt(1 - b2**t)``, ``step_size = -lr*c2/c1``;
  ``p = p + step_size * (s1 / (sqrt(s2) + c2*eps))``; then the decoupled weight decay on the updated weight,
  ``p = p * (1 - lr*wd)`` (bnb's order; torch.optim.AdamW decays before the Adam step); the weight uses the
  unquantised new states, which are then quantised with ``s / absmax``;
* quantisation = ``quantize_2D``'s binary search, which returns the nearest code, a tie between codes k and k+1
  going to whichever of the two is even; ``NaN`` (``0/0`` for an all-zero block) gives code 0; then the signed
  sign fix (if the code's sign bit differs from ``s1``'s: +1 for ``s1 > 0``, else -1, wrapping mod 256: an
  all-zero block stores state1 code 255). ``quantize_codes`` reproduces this bit for bit (the tests port
  ``quantize_2D`` literally).

Not matched (documented deviations):

* bnb keeps fp32 states for tensors under ``min_8bit_size=4096`` elements; here everything is 8-bit (one flat
  buffer; those tensors, biases and norms, hold well under 1 % of the SD1.5 UNet's parameters);
* bnb's tail block also reduces the items past the tensor's end (loaded as g=0, state1 code 128, state2 code 0:
  a phantom ``|s1| <= 5.5e-7*absmax``); here the pad elements are real zeros and contribute 0;
* bnb is compiled with ``--use_fast_math`` (``__powf``, ``__fdividef``, approximate ``sqrtf``, FMA contraction).
  The torch backend uses IEEE ``/`` and ``sqrt`` and ``b**t = exp2(t*log2(b))`` (the formula ``__powf``
  evaluates); the Triton kernel uses Triton's defaults (``/`` = ``div.full.f32``, approximate sqrt/exp2,
  FMA contraction). So states can land one code apart where a value is within a few ulp of a midpoint;
* the step count lives on the device (bnb: a python int per tensor); parameters without a gradient get a zero
  gradient (their moments decay and weight decay applies; bnb and torch skip them). ``skip`` has no bnb
  counterpart.

Caveats: build the optimizer after the model has its final device and dtype (``model.to`` afterwards replaces
the views); ``backward(create_graph=True)`` replaces ``p.grad`` instead of accumulating into the views (``step()``
copies such gradients back in, ``update()`` does not look).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
CODE_SIZE = 256
_STATE_BUFFERS = ("step_count", "state1", "state2", "absmax1", "absmax2")
# torch backend: elements per chunk of blocks (bounds each of its fp32 temporaries to 64 MiB)
TORCH_CHUNK_ELEMENTS = 1 << 24


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (what a ``const float`` kernel argument holds)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def dynamic_code_book(signed: bool) -> torch.Tensor:
    """bnb's ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``: 256 sorted fp32 codes in [-1, 1]
    (signed; min -0.99297) or [0, 1]. Decade i (0..6) holds ``10**(i-6)`` times the centres of ``2**i``
    (signed, mirrored for negatives) or ``2**(i+1)`` (unsigned) equal cells of [0.1, 1]; plus 0 and 1. The same
    fp32 ops as bnb, so the values are bit-identical."""
    data: list[float] = []
    for i in range(7):
        cells = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1, cells + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        if signed:
            data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 fp32 decision points between neighbouring codes, ``(code[k] + code[k+1]) * 0.5`` as bnb's
    ``quantize_2D`` computes them."""
    return (code[:-1] + code[1:]) * 0.5


@dataclass(frozen=True)
class CodeTables:
    """Code books and decision tables on one device. ``mid_*_ext`` = [-inf, midpoints..., +inf] (257, for the
    Triton kernel); ``mid_*_even/odd`` = midpoints after even / odd codes (for ``torch.searchsorted``)."""

    code_signed: torch.Tensor
    code_unsigned: torch.Tensor
    mid_signed_ext: torch.Tensor
    mid_unsigned_ext: torch.Tensor
    mid_signed_even: torch.Tensor
    mid_signed_odd: torch.Tensor
    mid_unsigned_even: torch.Tensor
    mid_unsigned_odd: torch.Tensor

    @classmethod
    def build(cls, device: torch.device) -> CodeTables:
        tables: dict[str, torch.Tensor] = {}
        for name, signed in (("signed", True), ("unsigned", False)):
            code = dynamic_code_book(signed)
            mid = code_midpoints(code)
            inf = torch.tensor([math.inf])
            tables[f"code_{name}"] = code
            tables[f"mid_{name}_ext"] = torch.cat([-inf, mid, inf])
            tables[f"mid_{name}_even"] = mid[0::2].contiguous()
            tables[f"mid_{name}_odd"] = mid[1::2].contiguous()
        return cls(**{k: v.to(device) for k, v in tables.items()})


def quantize_codes(x: torch.Tensor, s: torch.Tensor, tables: CodeTables, signed: bool) -> torch.Tensor:
    """Codes (uint8) of normalised values ``x = s / absmax``: what bnb's ``quantize_2D`` plus the state1 sign fix
    return. The nearest code is the number of midpoints ``x`` passes, passing midpoint k (between codes k and
    k+1) meaning ``x > m[k]`` for even k and ``x >= m[k]`` for odd k (ties go to the even code); NaN -> 0."""
    even = tables.mid_signed_even if signed else tables.mid_unsigned_even
    odd = tables.mid_signed_odd if signed else tables.mid_unsigned_odd
    c = torch.searchsorted(even, x, right=False) + torch.searchsorted(odd, x, right=True)
    c = torch.where(torch.isnan(x), 0, c)
    if signed:
        wrong_sign = (c < CODE_SIZE // 2 - 1) != torch.signbit(s)
        c = torch.where(wrong_sign, torch.where(s > 0, c + 1, c - 1), c)
    return (c & (CODE_SIZE - 1)).to(torch.uint8)


@dataclass(frozen=True)
class Hyper:
    """The constant hyper-parameters as float32 values (what the kernel computes with)."""

    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    log2_beta1: float
    log2_beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> Hyper:
        b1, b2 = (_f32(float(b)) for b in group["betas"])
        return cls(
            beta1=b1,
            beta2=b2,
            one_minus_beta1=_f32(1.0 - b1),  # exact: equals the fp32 subtraction 1.0f - beta1
            one_minus_beta2=_f32(1.0 - b2),
            log2_beta1=_f32(math.log2(b1)) if b1 > 0 else -math.inf,
            log2_beta2=_f32(math.log2(b2)) if b2 > 0 else -math.inf,
            eps=_f32(float(group["eps"])),
            weight_decay=_f32(float(group["weight_decay"])),
        )


def bias_corrections(t: torch.Tensor, hp: Hyper) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 - b1**t, sqrt(1 - b2**t))`` in fp32 with ``b**t = exp2(t * log2 b)`` (``t``: 0-dim fp32 tensor)."""
    corr1 = 1.0 - torch.exp2(t * hp.log2_beta1)
    corr2 = torch.sqrt(1.0 - torch.exp2(t * hp.log2_beta2))
    return corr1, corr2


def torch_update_blocks(
    p: torch.Tensor,
    g: torch.Tensor,
    q1: torch.Tensor,
    q2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    tables: CodeTables,
    hp: Hyper,
    *,
    lr: torch.Tensor,
    step: torch.Tensor,
    scale: torch.Tensor,
    keep: torch.Tensor,
) -> None:
    """The reference update, in place, of (rows, block) views: ``p``, ``g`` fp32; ``q1``, ``q2`` uint8 codes;
    ``absmax1``, ``absmax2`` (rows,). ``step`` is the step number of this update (1 for the first); where ``keep``
    (0-dim bool) is false every output is written back unchanged."""
    finite = torch.isfinite(g)
    gs = g * scale
    s1 = tables.code_signed[q1.long()] * absmax1[:, None]
    s2 = tables.code_unsigned[q2.long()] * absmax2[:, None]
    s2 = s2 * hp.beta2 + (hp.one_minus_beta2 * gs) * gs
    s1 = s1 * hp.beta1 + hp.one_minus_beta1 * gs
    s1 = torch.where(finite, s1, 0.0)
    s2 = torch.where(finite, s2, 0.0)
    new_absmax1 = s1.abs().amax(dim=1)
    new_absmax2 = s2.abs().amax(dim=1)
    corr1, corr2 = bias_corrections(step.to(torch.float32), hp)
    step_size = -lr * corr2 / corr1
    new_p = p + step_size * (s1 / (torch.sqrt(s2) + corr2 * hp.eps))
    new_p = new_p * (1.0 - lr * hp.weight_decay)
    new_p = torch.where(finite, new_p, p)
    new_q1 = quantize_codes(s1 / new_absmax1[:, None], s1, tables, signed=True)
    new_q2 = quantize_codes(s2 / new_absmax2[:, None], s2, tables, signed=False)
    for out, new in ((p, new_p), (q1, new_q1), (q2, new_q2), (absmax1, new_absmax1), (absmax2, new_absmax2)):
        out.copy_(torch.where(keep, new, out))


def _triton_module() -> ModuleType:
    """The Triton kernels (imports triton; only where the triton backend runs)."""
    from stages.lib.training import flat_adamw8bit_triton

    return flat_adamw8bit_triton


def _triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors (for developing the kernel without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def flat_adamw8bit_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``FlatAdamW8bit`` runs on ``device`` and how: the torch backend off CUDA, the Triton kernel on it."""
    device = torch.device(device)
    if device.type != "cuda":
        return True, f"torch backend on {device.type}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        _triton_module()
    except ImportError as err:
        return False, f"triton is not importable ({err})"
    return True, "triton kernel on cuda"


@dataclass
class TritonConfig:
    """Launch shape of the Triton kernel: ``rows`` blocks per program, ``num_warps``, and ``direct`` (quantise
    from an arithmetic first guess plus one neighbour check, else an 8-step binary search; same codes)."""

    rows: int = 4
    num_warps: int = 4
    direct: bool = True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return backend
    on_cuda = device.type == "cuda"
    if backend == "triton":
        if not (on_cuda or _triton_interpreted()):
            raise ValueError(
                f"backend='triton' needs CUDA (or TRITON_INTERPRET=1), the parameters are on {device}"
            )
        _triton_module()  # ImportError here: triton is missing
        return backend
    if not on_cuda:
        return "torch"
    ok, reason = flat_adamw8bit_available(device)
    if ok:
        return "triton"
    msg = f"FlatAdamW8bit: {reason}; using the (slower) torch backend on CUDA"
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return "torch"


def _check_params(params: list[Any]) -> list[torch.nn.Parameter]:
    if not params:
        raise ValueError("FlatAdamW8bit got no parameters")
    if any(isinstance(p, dict) for p in params):
        raise ValueError(
            "FlatAdamW8bit takes one parameter list (exactly one param group), not param-group dicts"
        )
    if len({id(p) for p in params}) != len(params):
        raise ValueError("FlatAdamW8bit got the same parameter twice")
    device = params[0].device
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or p.dtype != torch.float32 or not p.requires_grad:
            raise ValueError(f"parameter {i}: FlatAdamW8bit needs float32 tensors that require grad")
        if p.device != device:
            raise ValueError(f"parameter {i} is on {p.device}, parameter 0 on {device}: one device only")
    return params


def _dense_view(segment: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``segment`` (1-D, ``like.numel()`` long) shaped like ``like``, with its strides where ``like`` is dense in
    another layout (channels-last convolution weights stay channels-last); contiguous otherwise."""
    dense = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)
    return segment.as_strided(like.shape, like.stride()) if dense else segment.view(like.shape)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class FlatAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes-compatible blockwise 8-bit AdamW over one flat fp32 buffer; ``update()`` is CUDA-graph
    capturable (see the module docstring). Typical captured step::

        opt.zero_grad(); loss.backward(); opt.update(grad_scale=opt.clip_coefficient(1.0), skip=found_inf)

    and before each replay ``opt.sync_lr()`` (after the LR scheduler changed ``param_groups[0]["lr"]``)."""

    flat: torch.Tensor
    flat_grad: torch.Tensor
    lr_tensor: torch.Tensor
    step_count: torch.Tensor

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        block_size: int = 256,
        backend: str = "auto",
    ) -> None:
        params = _check_params(list(params))
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two >= 16")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.device = params[0].device
        self.block_size = block_size
        self.backend = _resolve_backend(backend, self.device)
        self.triton_config = TritonConfig()
        self._pack(params)
        self._allocate_state()
        if self.backend == "triton":
            self.warmup()

    # --- construction -------------------------------------------------------------------------------------------

    def _pack(self, params: list[torch.nn.Parameter]) -> None:
        """Copy the parameters into ``flat`` (each on a block boundary) and rebind ``p.data`` / ``p.grad`` to views."""
        self.numels = [p.numel() for p in params]
        self.offsets: list[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _round_up(n, self.block_size)
        self.flat = torch.zeros(total, dtype=torch.float32, device=self.device)
        self.flat_grad = torch.zeros_like(self.flat)
        self._params = params
        self._grad_views: list[torch.Tensor] = []
        with torch.no_grad():
            for p, off, n in zip(params, self.offsets, self.numels, strict=True):
                view = _dense_view(self.flat[off : off + n], p)
                view.copy_(p.data)
                grad_view = _dense_view(self.flat_grad[off : off + n], p)
                if p.grad is not None:
                    grad_view.copy_(p.grad)
                p.data = view
                p.grad = grad_view
                self._grad_views.append(grad_view)

    def _allocate_state(self) -> None:
        n, dev = self.flat.numel(), self.device
        self.n_blocks = n // self.block_size
        self.state1 = torch.zeros(n, dtype=torch.uint8, device=dev)
        self.state2 = torch.zeros(n, dtype=torch.uint8, device=dev)
        self.absmax1 = torch.zeros(self.n_blocks, dtype=torch.float32, device=dev)
        self.absmax2 = torch.zeros(self.n_blocks, dtype=torch.float32, device=dev)
        self.tables = CodeTables.build(dev)
        self.lr_tensor = torch.tensor(float(self.param_groups[0]["lr"]), dtype=torch.float32, device=dev)
        self.step_count = torch.zeros((), dtype=torch.int64, device=dev)
        self._scale = torch.ones((), dtype=torch.float32, device=dev)
        self._one = torch.ones((), dtype=torch.float32, device=dev)
        self._keep = torch.ones((), dtype=torch.int32, device=dev)
        self._keep_always = torch.ones((), dtype=torch.int32, device=dev)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise NotImplementedError("FlatAdamW8bit has exactly one param group")
        super().add_param_group(param_group)

    # --- gradients ----------------------------------------------------------------------------------------------

    def _rebind_grads(self, keep_values: bool) -> None:
        """Make every ``p.grad`` the view of ``flat_grad`` again where something replaced it (e.g. a
        ``module.zero_grad()`` that set it to None); ``keep_values`` copies a replacement gradient in."""
        for p, view in zip(self._params, self._grad_views, strict=True):
            if p.grad is view:
                continue
            if keep_values:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
            p.grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``flat_grad.zero_()`` whatever ``set_to_none`` says (the gradients must stay views); capturable."""
        self._rebind_grads(keep_values=False)
        self.flat_grad.zero_()

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of all gradients, a 0-dim fp32 tensor on the device (no sync); capturable."""
        return torch.linalg.vector_norm(self.flat_grad)

    def clip_coefficient(self, max_norm: float) -> torch.Tensor:
        """``clamp(max_norm / (norm + 1e-6), max=1)``, ``torch.nn.utils.clip_grad_norm_``'s factor, to pass as
        ``update(grad_scale=...)``; capturable."""
        return torch.clamp(max_norm / (self.grad_norm() + 1e-6), max=1.0)

    # --- the update ---------------------------------------------------------------------------------------------

    def sync_lr(self) -> None:
        """``lr_tensor <- param_groups[0]["lr"]`` (a host scalar into a device tensor, no sync). Not captured:
        call it before each graph replay, after the scheduler stepped."""
        self.lr_tensor.fill_(float(self.param_groups[0]["lr"]))

    def update(self, grad_scale: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> None:
        """One AdamW8bit update from ``flat_grad * grad_scale`` (a one-element tensor, e.g. ``clip_coefficient``;
        None: 1) with lr ``lr_tensor``; where ``skip`` (one-element bool or 0/1 tensor) is true nothing changes.
        No host sync; capturable (one kernel on CUDA, plus up to three one-element ops)."""
        self._update(grad_scale, skip)
        self._opt_called = True  # what LRScheduler.step() checks (it only sees step() calls otherwise)

    @torch.no_grad()
    def _update(self, grad_scale: torch.Tensor | None, skip: torch.Tensor | None) -> None:
        scale = self._one
        if grad_scale is not None:
            self._scale.copy_(grad_scale.reshape(()))
            scale = self._scale
        keep = self._keep_always
        if skip is not None:
            torch.logical_not(skip.reshape(()), out=self._keep)
            keep = self._keep
        self.step_count.add_(keep)  # the step number of this update (unchanged where skipped)
        hp = Hyper.from_group(self.param_groups[0])
        if self.backend == "triton":
            self._triton_update(hp, scale, keep)
        else:
            self._torch_update(hp, scale, keep)

    def _torch_update(self, hp: Hyper, scale: torch.Tensor, keep: torch.Tensor) -> None:
        b = self.block_size
        rows = max(1, TORCH_CHUNK_ELEMENTS // b)
        keep_bool = keep.to(torch.bool)
        views = (
            self.flat.view(-1, b),
            self.flat_grad.view(-1, b),
            self.state1.view(-1, b),
            self.state2.view(-1, b),
        )
        for r in range(0, self.n_blocks, rows):
            p, g, q1, q2 = (v[r : r + rows] for v in views)
            torch_update_blocks(
                p, g, q1, q2, self.absmax1[r : r + rows], self.absmax2[r : r + rows], self.tables, hp,
                lr=self.lr_tensor, step=self.step_count, scale=scale, keep=keep_bool,
            )  # fmt: skip

    def _triton_update(self, hp: Hyper, scale: torch.Tensor, keep: torch.Tensor) -> None:
        _triton_module().launch_update(self, hp, scale, keep, self.triton_config)

    def warmup(self) -> None:
        """Launch the update once with skip=True (nothing changes) so the Triton kernel is compiled with the
        specialisation later calls use; run it before CUDA-graph capture (the constructor already did, and again
        whenever ``triton_config`` changed)."""
        self._update(None, torch.ones((), dtype=torch.bool, device=self.device))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Eager convenience: ``sync_lr(); update()`` (after re-attaching replaced gradients)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rebind_grads(keep_values=True)
        self.sync_lr()
        self.update()
        return loss

    # --- checkpoints --------------------------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "numels": list(self.numels)}

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and python scalars (``torch.load(weights_only=True)`` loads it). The tensors are the live
        buffers, as with torch optimizers: save or clone before the next update."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._params)))
        state = {name: getattr(self, name) for name in _STATE_BUFFERS}
        return {"state": state, "param_groups": [group], "layout": self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a ``state_dict()`` into the existing buffers (their addresses, captured in graphs, stay valid) and
        restore the param group's values (lr, initial_lr, betas, ...)."""
        if state_dict.get("layout") != self._layout():
            raise ValueError(
                f"FlatAdamW8bit state_dict layout {state_dict.get('layout')} does not match these parameters "
                f"(block_size {self.block_size}, {len(self.numels)} tensors)"
            )
        groups = state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"FlatAdamW8bit state_dict has {len(groups)} param groups, expected 1")
        with torch.no_grad():
            for name in _STATE_BUFFERS:
                getattr(self, name).copy_(state_dict["state"][name])
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        self.sync_lr()
