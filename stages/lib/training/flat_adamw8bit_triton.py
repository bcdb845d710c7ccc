"""Triton kernel of ``FlatAdamW8bit`` (CUDA; imported lazily by ``stages.lib.training.flat_adamw8bit``, never on CPU-only
machines where triton is not installed).

One program updates ``rows`` blocks of ``BLOCK`` elements: loads gradient, weight and the two 8-bit states,
dequantises through the code books, applies the AdamW step (same fp32 expressions, same order as
``torch_update_blocks``), reduces the new absmax per block, quantises and stores. lr, step number, gradient
scale and keep flag are read from device pointers, so the launch is CUDA-graph capturable; where the keep flag
is 0 every load and store is masked off.

Quantisation returns what bnb's ``quantize_2D`` does (nearest code; a tie between codes k, k+1 goes to the even
one; NaN -> 0; then the state1 sign fix). ``DIRECT=True`` guesses the code arithmetically from the dynamic map's
layout (decade by six comparisons, then the cell inside the decade; off by at most one) and settles it with the
two neighbouring midpoints: 3 table loads per state instead of 8. ``DIRECT=False`` is a plain 8-step binary
search over the midpoints. Both give the same codes (tests: ``tests/test_gpu_flat_adamw8bit.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from stages.lib.training.flat_adamw8bit import FlatAdamW8bit, Hyper, TritonConfig


@triton.jit
def _first_guess(a, SIGNED: tl.constexpr):
    """Index of the code whose cell holds ``a >= 0`` (|x|), possibly off by one (see the module docstring)."""
    d = (
        (a >= 1e-6).to(tl.int32)
        + (a >= 1e-5).to(tl.int32)
        + (a >= 1e-4).to(tl.int32)
        + (a >= 1e-3).to(tl.int32)
        + (a >= 1e-2).to(tl.int32)
        + (a >= 1e-1).to(tl.int32)
    )
    inv_scale = tl.where(d == 0, 1e6, 1.0)  # 10 ** (6 - d), exact
    inv_scale = tl.where(d == 1, 1e5, inv_scale)
    inv_scale = tl.where(d == 2, 1e4, inv_scale)
    inv_scale = tl.where(d == 3, 1e3, inv_scale)
    inv_scale = tl.where(d == 4, 1e2, inv_scale)
    inv_scale = tl.where(d == 5, 10.0, inv_scale)
    if SIGNED:
        cells = tl.full(d.shape, 1, tl.int32) << d  # decade d: 2**d codes, the first at 128 + 2**d - 1
        first = cells + 127
    else:
        cells = tl.full(d.shape, 2, tl.int32) << d  # decade d: 2**(d+1) codes, the first at 2**(d+1) - 1
        first = cells - 1
    u = (a * inv_scale - 0.1) * (cells.to(tl.float32) * (1.0 / 0.9))
    u = tl.minimum(tl.maximum(u, 0.0), (cells - 1).to(tl.float32))
    return first + u.to(tl.int32)


@triton.jit
def _passes(x, m, k):
    """Whether ``x`` is past midpoint k (between codes k and k+1): ``x > m``, or ``x == m`` for odd k."""
    return (x > m) | ((x == m) & ((k & 1) == 1))


@triton.jit
def _quantize(x, s, mid_ptr, SIGNED: tl.constexpr, DIRECT: tl.constexpr):
    """uint8 codes of ``x = s / absmax``; ``mid_ptr``: [-inf, 255 midpoints, +inf]."""
    if DIRECT:
        not_nan = x == x
        guess = _first_guess(tl.where(not_nan, tl.abs(x), 0.0), SIGNED)
        if SIGNED:
            guess = tl.where(x < 0, 254 - guess, guess)
        lo = tl.load(mid_ptr + guess)  # midpoint guess-1
        hi = tl.load(mid_ptr + guess + 1)  # midpoint guess
        c = guess - 1 + _passes(x, lo, guess - 1).to(tl.int32) + _passes(x, hi, guess).to(tl.int32)
        c = tl.where(not_nan, c, 0)
    else:
        c = tl.zeros(x.shape, dtype=tl.int32)
        for i in tl.static_range(8):
            k = c + ((128 >> i) - 1)
            c = tl.where(_passes(x, tl.load(mid_ptr + k + 1), k), c + (128 >> i), c)
    if SIGNED:
        wrong_sign = (c < 127) != (s.to(tl.int32, bitcast=True) < 0)
        c = tl.where(wrong_sign, tl.where(s > 0, c + 1, c - 1), c)
    return (c & 255).to(tl.uint8)


@triton.jit
def _adamw8bit_kernel(
    p_ptr,
    g_ptr,
    q1_ptr,
    q2_ptr,
    absmax1_ptr,
    absmax2_ptr,
    code1_ptr,
    code2_ptr,
    mid1_ptr,
    mid2_ptr,
    lr_ptr,
    step_ptr,
    scale_ptr,
    keep_ptr,
    n_blocks,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log2_beta1,
    log2_beta2,
    eps,
    weight_decay,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    DIRECT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < tl.where(tl.load(keep_ptr) != 0, n_blocks, 0)  # skipped: every load and store masked off
    cols = tl.arange(0, BLOCK)[None, :]
    offs = rows[:, None] * BLOCK + cols
    mask = live[:, None] & (cols < BLOCK)  # full shape (the interpreter wants one)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    c1 = tl.load(q1_ptr + offs, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(q2_ptr + offs, mask=mask, other=0).to(tl.int32)
    s1 = tl.load(code1_ptr + c1) * tl.load(absmax1_ptr + rows, mask=live, other=0.0)[:, None]
    s2 = tl.load(code2_ptr + c2) * tl.load(absmax2_ptr + rows, mask=live, other=0.0)[:, None]
    finite = tl.abs(g) <= 3.4028234663852886e38  # false for inf and NaN
    gs = g * tl.load(scale_ptr)
    s2 = s2 * beta2 + (one_minus_beta2 * gs) * gs
    s1 = s1 * beta1 + one_minus_beta1 * gs
    s1 = tl.where(finite, s1, 0.0)
    s2 = tl.where(finite, s2, 0.0)
    new_absmax1 = tl.max(tl.abs(s1), axis=1)
    new_absmax2 = tl.max(tl.abs(s2), axis=1)

    lr = tl.load(lr_ptr)
    t = tl.load(step_ptr).to(tl.float32)
    corr1 = 1.0 - tl.exp2(t * log2_beta1)
    corr2 = tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    step_size = -lr * corr2 / corr1
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    new_p = p + step_size * (s1 / (tl.sqrt(s2) + corr2 * eps))
    new_p = new_p * (1.0 - lr * weight_decay)
    new_p = tl.where(finite, new_p, p)

    q1 = _quantize(s1 / new_absmax1[:, None], s1, mid1_ptr, True, DIRECT)
    q2 = _quantize(s2 / new_absmax2[:, None], s2, mid2_ptr, False, DIRECT)
    tl.store(p_ptr + offs, new_p, mask=mask)
    tl.store(q1_ptr + offs, q1, mask=mask)
    tl.store(q2_ptr + offs, q2, mask=mask)
    tl.store(absmax1_ptr + rows, new_absmax1, mask=live)
    tl.store(absmax2_ptr + rows, new_absmax2, mask=live)


def launch_update(
    opt: FlatAdamW8bit, hp: Hyper, scale: torch.Tensor, keep: torch.Tensor, config: TritonConfig
) -> None:
    """One launch over the whole flat buffer of ``opt`` (``opt.step_count`` already holds this update's step)."""
    t = opt.tables
    grid = (triton.cdiv(opt.n_blocks, config.rows),)
    _adamw8bit_kernel[grid](
        opt.flat, opt.flat_grad, opt.state1, opt.state2, opt.absmax1, opt.absmax2,
        t.code_signed, t.code_unsigned, t.mid_signed_ext, t.mid_unsigned_ext,
        opt.lr_tensor, opt.step_count, scale, keep, opt.n_blocks,
        hp.beta1, hp.beta2, hp.one_minus_beta1, hp.one_minus_beta2, hp.log2_beta1, hp.log2_beta2,
        hp.eps, hp.weight_decay,
        BLOCK=opt.block_size, ROWS=config.rows, DIRECT=config.direct, num_warps=config.num_warps,
    )  # fmt: skip


@triton.jit
def _quantize_kernel(
    x_ptr, s_ptr, out_ptr, mid_ptr, n, SIGNED: tl.constexpr, DIRECT: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _quantize(x, s, mid_ptr, SIGNED, DIRECT), mask=mask)


def quantize(
    x: torch.Tensor, s: torch.Tensor, mid_ext: torch.Tensor, signed: bool, direct: bool = True
) -> torch.Tensor:
    """The kernel's quantisation on its own (for tests): uint8 codes of contiguous fp32 ``x`` (``s``: the sign
    source, the unnormalised state)."""
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    block = 1024
    _quantize_kernel[(triton.cdiv(x.numel(), block),)](
        x, s, out, mid_ext, x.numel(), signed, direct, BLOCK=block
    )
    return out
