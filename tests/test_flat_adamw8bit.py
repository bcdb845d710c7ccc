"""FlatAdamW8bit on CPU (torch backend): packing into one flat buffer, AdamW behaviour, gradient clipping, skip,
checkpoints, LR schedules, and bitsandbytes compatibility against literal transcriptions of its sources
(create_dynamic_map, quantize_2D, kOptimizerStatic8bit2StateBlockwise). The Triton kernel's tests are in
tests/test_gpu_flat_adamw8bit.py."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

from stages.lib.training.flat_adamw8bit import (
    CodeTables,
    FlatAdamW8bit,
    Hyper,
    bias_corrections,
    dynamic_code_book,
    flat_adamw8bit_available,
    quantize_codes,
    torch_update_blocks,
)

F32 = np.float32
BUFFERS = ("flat", "state1", "state2", "absmax1", "absmax2", "step_count")


def _mlp(seed: int, hidden: int = 64) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def _regression(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> list[float]:
    """``steps`` full-batch steps on one regression data set; the losses before each step."""
    losses = []
    x, y = _regression(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _snapshot(opt: FlatAdamW8bit) -> dict[str, torch.Tensor]:
    return {name: getattr(opt, name).clone() for name in BUFFERS}


def _assert_same_buffers(a: FlatAdamW8bit | dict[str, torch.Tensor], b: FlatAdamW8bit) -> None:
    for name in BUFFERS:
        left = a[name] if isinstance(a, dict) else getattr(a, name)
        assert torch.equal(left, getattr(b, name)), name


# --- packing ------------------------------------------------------------------------------------------------


def test_params_become_views_of_flat_and_backward_fills_flat_grad() -> None:
    model = _mlp(0, hidden=37)  # sizes that are not multiples of the block
    reference = copy.deepcopy(model)
    opt = FlatAdamW8bit(model.parameters(), lr=1e-3, block_size=256)
    base = opt.flat.data_ptr()
    covered = torch.zeros(opt.flat.numel(), dtype=torch.bool)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        offset = (p.data_ptr() - base) // 4
        assert p.untyped_storage().data_ptr() == opt.flat.untyped_storage().data_ptr()
        assert offset % 256 == 0, "each parameter starts on a block boundary"
        assert torch.equal(p.detach(), q.detach())
        assert (
            p.grad is not None
            and p.grad.untyped_storage().data_ptr() == opt.flat_grad.untyped_storage().data_ptr()
        )
        covered[offset : offset + p.numel()] = True
    assert opt.flat.numel() % 256 == 0
    assert not opt.flat[~covered].any(), "the pad is zeros"

    x, y = _regression(1)
    for m in (model, reference):
        _loss(m, x, y).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=0)
    assert not opt.flat_grad[~covered].any()
    _loss(model, x, y).backward()  # accumulates in place
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, 2 * q.grad, rtol=1e-6, atol=1e-7)

    opt.zero_grad(set_to_none=True)
    assert not opt.flat_grad.any()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)  # a module-level reset replaces the views...
    _loss(model, x, y).backward()
    opt.step()  # ...and step() copies those gradients back in before updating
    assert opt.flat_grad.abs().sum() > 0
    assert all(p.grad.data_ptr() >= opt.flat_grad.data_ptr() for p in model.parameters())


def test_channels_last_weights_keep_their_layout_and_gradients() -> None:
    """A channels-last convolution (compute.channels_last) stays channels-last inside the flat buffer, and its
    gradient lands there as an unpacked copy computes it."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(conv)
    opt = FlatAdamW8bit(conv.parameters(), lr=1e-3)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.untyped_storage().data_ptr() == opt.flat.untyped_storage().data_ptr()
    assert torch.equal(conv.weight.detach(), reference.weight.detach())
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    for m in (conv, reference):
        m(x).square().mean().backward()
    assert torch.allclose(conv.weight.grad, reference.weight.grad, rtol=1e-6, atol=1e-7)
    assert conv.weight.grad.untyped_storage().data_ptr() == opt.flat_grad.untyped_storage().data_ptr()


def test_rejects_what_it_cannot_pack() -> None:
    half = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    p = torch.nn.Parameter(torch.zeros(4))
    for params in ([], [half], [frozen], [p, p], [{"params": [p]}]):
        with pytest.raises(ValueError):
            FlatAdamW8bit(params, lr=1e-3)
    with pytest.raises(ValueError):
        FlatAdamW8bit([p], lr=1e-3, block_size=100)
    with pytest.raises(ValueError):
        FlatAdamW8bit([p], lr=1e-3, backend="triton")  # no CUDA here
    with pytest.raises(NotImplementedError):
        FlatAdamW8bit([p], lr=1e-3).add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_cpu_uses_the_torch_backend_without_triton() -> None:
    assert flat_adamw8bit_available(torch.device("cpu"))[0]
    opt = FlatAdamW8bit([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    assert opt.backend == "torch"
    assert "stages.lib.training.flat_adamw8bit_triton" not in sys.modules


# --- behaviour ----------------------------------------------------------------------------------------------


def _linear_regression(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    return x, x @ torch.randn(32, 16, generator=g) + 0.1 * torch.randn(256, 16, generator=g)


def test_fifty_steps_track_fp32_adamw() -> None:
    """50 full-batch steps of linear regression (528 weights): the total weight change differs from fp32
    torch.optim.AdamW's by < 6 % (relative L2; 3.2-4.0 % measured over seeds and lr 3e-3/1e-2: the 8-bit
    states' rounding, not a bias), and the loss falls below half, within 3 % of AdamW's."""
    x, y = _linear_regression(10)
    models = []
    for _ in range(2):
        torch.manual_seed(10)
        models.append(torch.nn.Linear(32, 16))
    start = torch.cat([p.detach().flatten().clone() for p in models[1].parameters()])
    opts = (
        FlatAdamW8bit(models[0].parameters(), lr=1e-2, weight_decay=1e-2),
        torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=1e-2),
    )
    initial = _loss(models[0], x, y).item()
    for model, opt in zip(models, opts, strict=True):
        for _ in range(50):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    w8, w32 = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models)
    rel = ((w8 - w32).norm() / (w32 - start).norm()).item()
    assert 0 < rel < 0.06, rel
    final8, final32 = (_loss(m, x, y).item() for m in models)
    assert final8 < 0.5 * initial
    assert final8 == pytest.approx(final32, rel=0.03)
    assert int(opts[0].step_count) == 50


def test_grad_scale_from_clip_coefficient_equals_clip_grad_norm() -> None:
    models = [_mlp(3) for _ in range(3)]
    opts = [FlatAdamW8bit(m.parameters(), lr=1e-2) for m in models]
    for step in range(4):
        x, y = _regression(200 + step)
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            _loss(m, x, y).backward()
        total = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm=0.05)
        opts[0].step()
        coef = opts[1].clip_coefficient(0.05)
        assert torch.allclose(opts[1].grad_norm(), total, rtol=1e-5)
        assert coef.item() < 1.0, "clipping is active"
        opts[1].sync_lr()
        opts[1].update(grad_scale=coef)
        opts[2].step()  # unclipped: must differ
    assert torch.allclose(opts[1].flat, opts[0].flat, rtol=1e-5, atol=1e-7)
    assert (opts[2].flat - opts[0].flat).abs().max() > 1e-4
    assert torch.equal(opts[1].clip_coefficient(1e9), torch.tensor(1.0))


def test_skip_changes_nothing_then_steps_normally() -> None:
    model, twin = _mlp(4), _mlp(4)
    opt, opt_twin = FlatAdamW8bit(model.parameters(), lr=1e-2), FlatAdamW8bit(twin.parameters(), lr=1e-2)
    _train(model, opt, 3, seed=300)
    _train(twin, opt_twin, 3, seed=300)
    x, y = _regression(400)
    for m, o in ((model, opt), (twin, opt_twin)):
        o.zero_grad()
        _loss(m, x, y).backward()
    before = _snapshot(opt)
    opt.sync_lr()
    for skip in (torch.tensor(True), torch.tensor(1.0), torch.ones(1, dtype=torch.int64)):
        opt.update(skip=skip)
        _assert_same_buffers(before, opt)
    opt.update(skip=torch.tensor(False))
    assert int(opt.step_count) == 4
    assert not torch.equal(before["flat"], opt.flat)
    opt_twin.step()  # never saw the skipped calls
    _assert_same_buffers(opt_twin, opt)


def test_nonfinite_gradient_elements_are_left_alone() -> None:
    """bnb's per-element rule: a NaN/inf gradient leaves that weight as it is and zeroes its states."""
    p = torch.nn.Parameter(torch.randn(512))
    opt = FlatAdamW8bit([p], lr=1e-2)
    opt.flat_grad.normal_()
    opt.step()
    before = p.detach().clone()
    opt.flat_grad.normal_()
    opt.flat_grad[[3, 300]] = torch.tensor([float("nan"), float("inf")])
    opt.step()
    assert torch.equal(p.detach()[[3, 300]], before[[3, 300]])
    assert (p.detach() != before).sum() >= 500
    assert opt.flat.isfinite().all() and opt.absmax1.isfinite().all() and opt.absmax2.isfinite().all()
    assert opt.state2[3] == 0 and opt.state2[300] == 0  # unsigned code 0 = 0.0
    assert opt.tables.code_signed[opt.state1[[3, 300]].long()].abs().max() < 1e-6


def test_state_dict_round_trip_is_bitwise(tmp_path: Path) -> None:
    model = _mlp(5)
    opt = FlatAdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.05)
    _train(model, opt, 3, seed=500)
    opt.param_groups[0]["lr"] = 3e-3  # as a scheduler would have set it
    opt.param_groups[0]["initial_lr"] = 1e-2
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, 4, seed=600)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _mlp(99)  # other weights and a fresh optimizer: everything must come from the checkpoint
    resumed_opt = FlatAdamW8bit(resumed.parameters(), lr=1.0, weight_decay=0.05)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0]["lr"] == 3e-3 and resumed_opt.param_groups[0]["initial_lr"] == 1e-2
    assert int(resumed_opt.step_count) == 3
    _train(resumed, resumed_opt, 4, seed=600)
    _assert_same_buffers(opt, resumed_opt)

    other = FlatAdamW8bit(_mlp(5, hidden=8).parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="layout"):
        other.load_state_dict(saved["opt"])


def test_lr_schedule_drives_lr_tensor() -> None:
    model = _mlp(6)
    opt = FlatAdamW8bit(model.parameters(), lr=1e-2)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=6)
    assert opt.param_groups[0]["initial_lr"] == 1e-2
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(6):
            x, y = _regression(700 + step, n=32)
            opt.zero_grad()
            _loss(model, x, y).backward()
            before = opt.flat.clone()
            opt.sync_lr()
            assert opt.lr_tensor.item() == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6)
            opt.update()  # the captured path: no step()
            seen.append(opt.lr_tensor.item())
            if step == 0:  # warm-up starts at lr 0: no change at all
                assert torch.equal(before, opt.flat)
            sched.step()
            assert opt.lr_tensor.item() == pytest.approx(seen[-1], rel=1e-6), "follows only after sync_lr"
    assert seen == pytest.approx([0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3], rel=1e-6)


# --- bitsandbytes compatibility -----------------------------------------------------------------------------


def _bnb_create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> torch.Tensor:
    """bitsandbytes 0.50.2 bitsandbytes/functional.py create_dynamic_map, transcribed."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1,
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    assert additional_items == 0
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def test_code_books_are_bnb_dynamic_maps() -> None:
    signed, unsigned = dynamic_code_book(True), dynamic_code_book(False)
    for code in (signed, unsigned):
        assert code.shape == (256,) and code.dtype == torch.float32
        assert (code[1:] > code[:-1]).all()
    assert signed[255] == 1.0 and signed[127] == 0.0 and -1.0 <= signed[0] < -0.99
    assert unsigned[0] == 0.0 and unsigned[255] == 1.0
    assert torch.equal(signed, _bnb_create_dynamic_map(True))
    assert torch.equal(unsigned, _bnb_create_dynamic_map(False))

    def cell_mean(cells: int, j: int, decade: int) -> float:  # the formula, evaluated in fp32 like bnb
        b = torch.linspace(0.1, 1, cells + 1, dtype=torch.float32)
        return ((10 ** (decade - 6)) * ((b[j] + b[j + 1]) / 2.0)).item()

    assert signed[128] == cell_mean(1, 0, 0) == pytest.approx(5.5e-7)  # smallest positive: 1e-6 * 0.55
    assert signed[129] == cell_mean(2, 0, 1) == pytest.approx(3.25e-6)
    assert signed[254] == cell_mean(64, 63, 6) == pytest.approx(0.99296875)
    assert signed[0] == -signed[254]
    assert unsigned[1] == cell_mean(2, 0, 0) == pytest.approx(3.25e-7)
    assert unsigned[254] == cell_mean(128, 127, 6) == pytest.approx(0.996484375)


def _bnb_quantize_2d(code: np.ndarray, x: np.ndarray, signed: bool) -> np.ndarray:
    """csrc/kernels.cu quantize_2D<SIGNED>, transcribed (vectorised over x; the int/float locals become arrays)."""
    quadrants = np.array([code[(k * 256 // 4) + (256 // 4 - 1)] for k in range(3)], dtype=F32)
    pivot = np.full(x.shape, 127)
    upper_pivot = np.full(x.shape, 255)
    lower_pivot = np.zeros(x.shape, dtype=int)
    lower = np.full(x.shape, F32(-1.0 if signed else 0.0))
    upper = np.full(x.shape, F32(1.0))
    val = np.full(x.shape, quadrants[1])
    local_pivot = np.ones(x.shape, dtype=int)
    offset = 1
    i = 64
    while i > 0:
        gt = x > val
        lower_pivot, lower = np.where(gt, pivot, lower_pivot), np.where(gt, val, lower)
        upper_pivot, upper = np.where(gt, upper_pivot, pivot), np.where(gt, upper, val)
        pivot = np.where(gt, pivot + i, pivot - i)
        local_pivot = np.where(gt, local_pivot + offset, local_pivot - offset)
        val = quadrants[local_pivot] if i >= 64 else code[pivot]
        offset -= 1
        i >>= 1
    gt = x > val
    up = np.where(x > (upper + val) * F32(0.5), upper_pivot, pivot)
    down = np.where(x < (lower + val) * F32(0.5), lower_pivot, pivot)
    return np.where(gt, up, down)


def _bnb_sign_fix(code: np.ndarray, c1: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """The kernel's 'make sure state1 term has still the same sign after quantization' (unsigned char wrap)."""
    wrong = np.signbit(code[c1]) != np.signbit(s1)
    return np.where(wrong, np.where(s1 > 0, c1 + 1, c1 - 1), c1) % 256


def _values_with_ties(code: torch.Tensor, n_random: int = 4000) -> torch.Tensor:
    mid = (code[:-1] + code[1:]) * 0.5
    near = [torch.nextafter(v, torch.tensor(d)) for v in (code, mid) for d in (2.0, -2.0)]
    g = torch.Generator().manual_seed(7)
    r = torch.rand(n_random, generator=g)
    lo = code[0].item()
    x = torch.cat([code, mid, *near, r, r**8, lo * r, lo * r**8, torch.tensor([0.0, -0.0, float("nan")])])
    return x[((x >= lo) & (x <= 1)) | x.isnan()]


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_equals_bnb_binary_search(signed: bool) -> None:
    """Nearest code with bnb's tie rule (ties to the even index of the pair, NaN -> 0, then the sign fix), on
    every code, every midpoint, their float neighbours and random values: equal to quantize_2D everywhere."""
    tables = CodeTables.build(torch.device("cpu"))
    code = tables.code_signed if signed else tables.code_unsigned
    x = _values_with_ties(code)
    s = torch.where(x.isnan(), 0.0, x * 3.0)  # the state before normalising (its sign drives the fix)
    ours = quantize_codes(x, s, tables, signed).numpy().astype(int)
    with np.errstate(invalid="ignore"):
        theirs = _bnb_quantize_2d(code.numpy(), x.numpy(), signed)
        if signed:
            theirs = _bnb_sign_fix(code.numpy(), theirs, s.numpy())
    assert np.array_equal(ours, theirs)
    mid = ((code[:-1] + code[1:]) * 0.5).numpy()
    ties = quantize_codes(torch.from_numpy(mid), torch.from_numpy(mid), tables, signed).numpy().astype(int)
    k = np.arange(255)
    tie_code = np.where(k % 2 == 0, k, k + 1)
    if signed:  # the midpoint between -5.5e-7 and 0 goes to code 127 (0.0), then the sign fix moves it down
        tie_code[126] = 126
    assert np.array_equal(ties, tie_code)


def _bnb_kernel_port(
    p: np.ndarray, g: np.ndarray, c1: np.ndarray, c2: np.ndarray, absmax1: np.ndarray, absmax2: np.ndarray,
    code1: np.ndarray, code2: np.ndarray, beta1: F32, beta2: F32, eps: F32, lr: F32, weight_decay: F32,
    gnorm_scale: F32, correction1: F32, correction2: F32,
) -> tuple[np.ndarray, ...]:  # fmt: skip
    """kOptimizerStatic8bit2StateBlockwise<float, ADAM, 256, 1>, transcribed per (row = CUDA block, column =
    thread) in fp32, with __fdividef -> IEEE '/', and __powf's results passed in (correction1, correction2)."""
    ok = ~np.isnan(g) & ~np.isinf(g)
    s2 = code2[c2] * absmax2[:, None]
    g_val = g * gnorm_scale
    s2 = (s2 * beta2) + ((F32(1.0) - beta2) * g_val * g_val)
    s1 = code1[c1] * absmax1[:, None]
    s1 = (s1 * beta1) + ((F32(1.0) - beta1) * g_val)
    s1, s2 = np.where(ok, s1, F32(0)), np.where(ok, s2, F32(0))
    new_absmax1 = np.maximum(np.abs(s1).max(axis=1), F32(-3.4028235e38))
    new_absmax2 = np.maximum(np.abs(s2).max(axis=1), F32(-3.4028235e38))
    step_size = (-lr * correction2) / correction1
    new_p = p + (step_size * (s1 / (np.sqrt(s2) + (correction2 * eps))))
    if weight_decay > 0.0:
        new_p = new_p * (F32(1.0) - (lr * weight_decay))
    new_p = np.where(ok, new_p, p)
    q1 = _bnb_quantize_2d(code1, s1 / new_absmax1[:, None], signed=True)
    q1 = _bnb_sign_fix(code1, q1, s1)
    q2 = _bnb_quantize_2d(code2, s2 / new_absmax2[:, None], signed=False)
    return new_p, q1, q2, new_absmax1, new_absmax2


def test_update_equals_transcribed_bnb_kernel_bitwise() -> None:
    """One update of random 8-bit states (incl. NaN/inf gradients and an all-zero block, whose 0/0 codes bnb
    stores as state1=255, state2=0) equals the transcribed CUDA kernel bit for bit."""
    rows, block = 6, 256
    g = torch.Generator().manual_seed(8)
    p = torch.randn(rows, block, generator=g)
    grad = torch.randn(rows, block, generator=g) * torch.logspace(-6, 1, rows)[:, None]
    grad[1, [5, 9]] = torch.tensor([float("nan"), float("-inf")])
    q1 = torch.randint(0, 256, (rows, block), generator=g, dtype=torch.uint8)
    q2 = torch.randint(0, 256, (rows, block), generator=g, dtype=torch.uint8)
    absmax1 = torch.rand(rows, generator=g)
    absmax2 = torch.rand(rows, generator=g) * 1e-2
    grad[4], absmax1[4], absmax2[4] = 0.0, 0.0, 0.0
    tables = CodeTables.build(torch.device("cpu"))
    hp = Hyper.from_group({"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2})
    lr, step, scale = torch.tensor(3e-4), torch.tensor(7), torch.tensor(0.7)
    corr1, corr2 = bias_corrections(step.float(), hp)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = _bnb_kernel_port(
            *(t.numpy() for t in (p, grad)), q1.numpy().astype(int), q2.numpy().astype(int),
            absmax1.numpy(), absmax2.numpy(), tables.code_signed.numpy(), tables.code_unsigned.numpy(),
            F32(0.9), F32(0.999), F32(1e-8), F32(lr.item()), F32(1e-2), F32(scale.item()),
            F32(corr1.item()), F32(corr2.item()),
        )  # fmt: skip
    torch_update_blocks(p, grad, q1, q2, absmax1, absmax2, tables, hp, lr=lr, step=step, scale=scale,
                        keep=torch.tensor(True))  # fmt: skip
    for ours, theirs in zip((p, q1, q2, absmax1, absmax2), expected, strict=True):
        assert np.array_equal(ours.numpy().astype(theirs.dtype), theirs)
    assert (q1[4] == 255).all() and (q2[4] == 0).all()
