"""FlatAdamW8bit's Triton kernel on CUDA (run on a CUDA host with `pytest -m gpu -k flat_adamw8bit`;
deselected elsewhere): the kernel against the torch backend, against bitsandbytes' AdamW8bit, inside a CUDA
graph, and a timing print at SD1.5-UNet size."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from stages.lib.training.flat_adamw8bit import (
    CodeTables,
    FlatAdamW8bit,
    flat_adamw8bit_available,
    quantize_codes,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BUFFERS = ("flat", "state1", "state2", "absmax1", "absmax2", "step_count")
SIZES = [(1,), (7,), (256,), (300, 5), (4097,), (64, 3, 3, 3), (1280,), (1024, 1024)]


@pytest.fixture(autouse=True)
def _needs_triton() -> None:
    assert torch.cuda.is_available(), "the gpu tests need CUDA"
    ok, reason = flat_adamw8bit_available(CUDA)
    assert ok, reason


def _params(sizes: list[tuple[int, ...]], seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, device=CUDA)) for s in sizes]


def _copy_state(dst: FlatAdamW8bit, src: FlatAdamW8bit) -> None:
    for name in (*BUFFERS, "flat_grad", "lr_tensor"):
        getattr(dst, name).copy_(getattr(src, name))


def _randomise(opt: FlatAdamW8bit, g: torch.Generator) -> None:
    """Random 8-bit states and absmax, a random step count and gradients of random scale."""
    opt.state1.copy_(torch.randint(0, 256, opt.state1.shape, generator=g, device=CUDA, dtype=torch.uint8))
    opt.state2.copy_(torch.randint(0, 256, opt.state2.shape, generator=g, device=CUDA, dtype=torch.uint8))
    opt.absmax1.copy_(torch.rand(opt.absmax1.shape, generator=g, device=CUDA) * 1e-2)
    opt.absmax2.copy_(torch.rand(opt.absmax2.shape, generator=g, device=CUDA) * 1e-4)
    opt.step_count.fill_(int(torch.randint(0, 1000, (), generator=g, device=CUDA)))
    scale = 10.0 ** torch.randint(-5, 1, (opt.n_blocks, 1), generator=g, device=CUDA)
    opt.flat_grad.view(opt.n_blocks, -1).copy_(
        torch.randn(opt.n_blocks, opt.block_size, generator=g, device=CUDA) * scale
    )


def _code_mismatch(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Fraction of codes that differ, and the largest difference (mod 256: 0 and 255 are neighbours)."""
    d = (a.int() - b.int()).abs()
    d = torch.minimum(d, 256 - d)
    return (d > 0).float().mean().item(), int(d.max())


# --- quantisation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_quantisation_equals_reference(signed: bool, direct: bool) -> None:
    """Codes, midpoints, their float neighbours, decade edges, 0, -0, NaN and random values: identical codes."""
    from stages.lib.training.flat_adamw8bit_triton import quantize

    tables = CodeTables.build(CUDA)
    code = tables.code_signed if signed else tables.code_unsigned
    mid = (code[:-1] + code[1:]) * 0.5
    decades = torch.tensor([10.0**k for k in range(-8, 1)], device=CUDA)
    pieces = [code, mid, decades, torch.tensor([0.0, -0.0, float("nan")], device=CUDA)]
    pieces += [torch.nextafter(v, torch.full_like(v, d)) for v in (code, mid, decades) for d in (2.0, -2.0)]
    r = torch.rand(1 << 20, generator=torch.Generator(device=CUDA).manual_seed(0), device=CUDA)
    pieces += [r, r**4, r**12, r**20]
    x = torch.cat(pieces + ([-p for p in pieces] if signed else []))
    x = x[((x >= code[0]) & (x <= 1)) | x.isnan()].contiguous()
    s = torch.where(x.isnan(), 0.0, x * 3.0)
    mid_ext = tables.mid_signed_ext if signed else tables.mid_unsigned_ext
    assert torch.equal(quantize(x, s, mid_ext, signed, direct), quantize_codes(x, s, tables, signed))


# --- triton == torch backend --------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,num_warps,direct", [(4, 4, True), (1, 2, False), (8, 8, True)])
def test_triton_update_matches_torch_backend(rows: int, num_warps: int, direct: bool) -> None:
    """From identical random states and gradients, one update each, 8 times: the same codes except where a value
    lies within float rounding of a code midpoint (< 0.1 % of codes, one code apart), absmax to 1e-5, weight
    changes to 1e-3 of the update (Triton's approximate exp2/sqrt/div and FMA against torch's IEEE ops; at step 1
    the bias correction 1 - 0.999**t amplifies exp2's rounding to ~1e-4)."""
    tri = FlatAdamW8bit(_params(SIZES, 0), lr=1e-3, weight_decay=0.1, backend="triton")
    tri.triton_config.rows, tri.triton_config.num_warps, tri.triton_config.direct = rows, num_warps, direct
    tri.warmup()
    ref = FlatAdamW8bit(_params(SIZES, 0), lr=1e-3, weight_decay=0.1, backend="torch")
    g = torch.Generator(device=CUDA).manual_seed(1)
    for trial in range(8):
        _randomise(ref, g)
        ref.flat_grad[5] = float("nan") if trial == 3 else ref.flat_grad[5]
        _copy_state(tri, ref)
        before = ref.flat.clone()
        scale = torch.tensor(0.3 + 0.1 * trial, device=CUDA)
        ref.update(grad_scale=scale)
        tri.update(grad_scale=scale)
        assert torch.equal(tri.step_count, ref.step_count)
        for mine, theirs in ((tri.state1, ref.state1), (tri.state2, ref.state2)):
            frac, worst = _code_mismatch(mine, theirs)
            assert frac < 1e-3 and worst <= 1, (frac, worst)
        for mine, theirs in ((tri.absmax1, ref.absmax1), (tri.absmax2, ref.absmax2)):
            assert torch.allclose(mine, theirs, rtol=1e-5, atol=0)
        delta_tri, delta_ref = tri.flat - before, ref.flat - before
        assert (delta_tri - delta_ref).abs().max() <= 1e-3 * delta_ref.abs().max()
        assert (delta_tri - delta_ref).norm() <= 1e-3 * delta_ref.norm()


def test_triton_and_torch_backends_stay_together_for_50_steps() -> None:
    """50 steps from the same gradients: weights within 1e-3 of the total update, < 1 % of state1 codes apart."""
    tri = FlatAdamW8bit(_params(SIZES, 2), lr=1e-3, backend="triton")
    ref = FlatAdamW8bit(_params(SIZES, 2), lr=1e-3, backend="torch")
    start = ref.flat.clone()
    g = torch.Generator(device=CUDA).manual_seed(3)
    for _ in range(50):
        grad = torch.randn(ref.flat.shape, generator=g, device=CUDA) + 0.3 * ref.flat
        for opt in (tri, ref):
            opt.flat_grad.copy_(grad)
            opt.step()
    rel = ((tri.flat - ref.flat).norm() / (ref.flat - start).norm()).item()
    assert rel < 1e-3, rel
    assert _code_mismatch(tri.state1, ref.state1)[0] < 1e-2


# --- bitsandbytes -------------------------------------------------------------------------------------------


def _mlp(seed: int) -> torch.nn.Sequential:
    """9.45 M parameters in 10 tensors, 6 of them (biases, LayerNorm) under bnb's min_8bit_size (4096)."""
    torch.manual_seed(seed)
    layers = [
        torch.nn.Linear(1024, 2048),
        torch.nn.LayerNorm(2048),
        torch.nn.GELU(),
        torch.nn.Linear(2048, 2048),
    ]
    layers += [torch.nn.GELU(), torch.nn.Linear(2048, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024)]
    return torch.nn.Sequential(*layers).to(CUDA)


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("min_8bit_size", [1, 4096])
def test_matches_bitsandbytes_adamw8bit(min_8bit_size: int) -> None:
    """50 steps on a ~9.5 M-parameter regression, against bnb.optim.AdamW8bit. min_8bit_size=1 (bnb quantises
    every tensor, as we do): after step 1 the codes agree to > 99.9 % (fast-math rounding ties) and absmax to
    1e-5; after 50 steps the weights agree to 1 % of the total update. Default 4096 (bnb keeps the 6 small
    tensors' states in fp32): 2 % (a CPU proxy of that difference on a similar model measured 0.4 %)."""
    bnb = pytest.importorskip("bitsandbytes")
    teacher, ours, theirs = _mlp(1), _mlp(0), _mlp(0)
    start = _weights(ours)
    opt = FlatAdamW8bit(ours.parameters(), lr=1e-4, weight_decay=1e-2)
    bnb_opt = bnb.optim.AdamW8bit(
        theirs.parameters(), lr=1e-4, weight_decay=1e-2, min_8bit_size=min_8bit_size
    )
    g = torch.Generator(device=CUDA).manual_seed(0)
    for step in range(50):
        x = torch.randn(256, 1024, generator=g, device=CUDA)
        with torch.no_grad():
            y = teacher(x)
        for model, o in ((ours, opt), (theirs, bnb_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
        if step == 0 and min_8bit_size == 1:
            _assert_states_match_bnb(opt, bnb_opt, list(theirs.parameters()))
            rel1 = ((_weights(ours) - _weights(theirs)).norm() / (_weights(theirs) - start).norm()).item()
            assert rel1 < 1e-3, rel1
    rel = ((_weights(ours) - _weights(theirs)).norm() / (_weights(theirs) - start).norm()).item()
    print(f"min_8bit_size={min_8bit_size}: |w_ours - w_bnb| / |w_bnb - w0| after 50 steps = {rel:.2e}")
    assert rel < (1e-2 if min_8bit_size == 1 else 2e-2), rel


def _assert_states_match_bnb(
    opt: FlatAdamW8bit, bnb_opt: torch.optim.Optimizer, theirs: list[torch.Tensor]
) -> None:
    """Our per-tensor slices of the codes and absmax against bnb's state for the same tensors."""
    mismatched, total = 0, 0
    for q, off, n in zip(theirs, opt.offsets, opt.numels, strict=True):
        state = bnb_opt.state[q]
        blocks = slice(off // opt.block_size, off // opt.block_size + -(-n // opt.block_size))
        for i in (1, 2):
            mine = getattr(opt, f"state{i}")[off : off + n]
            mismatched += int((mine != state[f"state{i}"].flatten()).sum())
            total += n
            assert torch.allclose(getattr(opt, f"absmax{i}")[blocks], state[f"absmax{i}"], rtol=1e-5, atol=0)
    assert mismatched <= 1e-3 * total, (mismatched, total)


# --- CUDA graphs --------------------------------------------------------------------------------------------


def test_update_captured_in_a_cuda_graph_equals_eager_updates() -> None:
    """update(grad_scale, skip) captured once and replayed 5 times (new gradients, lr, scale; one skipped) gives
    bit-identical buffers to 5 eager updates."""
    graphed = FlatAdamW8bit(_params(SIZES, 4), lr=1e-3, backend="triton")
    eager = FlatAdamW8bit(_params(SIZES, 4), lr=1e-3, backend="triton")
    scale = torch.ones((), device=CUDA)
    skip = torch.zeros((), dtype=torch.bool, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.warmup()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.update(grad_scale=scale, skip=skip)
    g = torch.Generator(device=CUDA).manual_seed(5)
    for i in range(5):
        grad = torch.randn(graphed.flat.shape, generator=g, device=CUDA)
        lr, scale_value, skipped = 1e-3 * (i + 1), 0.5 + 0.1 * i, i == 2
        graphed.flat_grad.copy_(grad)
        scale.fill_(scale_value)
        skip.fill_(skipped)
        graphed.param_groups[0]["lr"] = lr
        graphed.sync_lr()
        graph.replay()
        eager.flat_grad.copy_(grad)
        eager.param_groups[0]["lr"] = lr
        eager.sync_lr()
        eager.update(
            grad_scale=torch.tensor(scale_value, device=CUDA), skip=torch.tensor(skipped, device=CUDA)
        )
    torch.cuda.synchronize()
    assert int(graphed.step_count) == 4
    for name in BUFFERS:
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name


def test_whole_training_step_in_one_cuda_graph() -> None:
    """zero_grad, forward, backward (into the flat gradient views), clip coefficient and update captured as one
    graph; 5 replays track 5 eager steps (to 1e-3 of the total update: cuBLAS may pick other algorithms under
    capture, and a rounding difference can move a state one code)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).to(CUDA)
    twin = copy.deepcopy(model)
    opt = FlatAdamW8bit(model.parameters(), lr=1e-3, backend="triton")
    opt_twin = FlatAdamW8bit(twin.parameters(), lr=1e-3, backend="triton")
    x, y = torch.zeros(32, 64, device=CUDA), torch.zeros(32, 8, device=CUDA)

    def train_step(m: torch.nn.Module, o: FlatAdamW8bit) -> None:
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        norm = o.grad_norm()
        o.update(grad_scale=o.clip_coefficient(0.5), skip=~torch.isfinite(norm))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up torch's CUDA-graph docs ask for, on both copies alike
        for _ in range(3):
            train_step(model, opt)
            train_step(twin, opt_twin)
    torch.cuda.current_stream().wait_stream(side)
    start = opt.flat.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt)
    g = torch.Generator(device=CUDA).manual_seed(6)
    for _ in range(5):
        x.copy_(torch.randn(x.shape, generator=g, device=CUDA))
        y.copy_(torch.randn(y.shape, generator=g, device=CUDA))
        opt.sync_lr()
        graph.replay()
        opt_twin.sync_lr()
        train_step(twin, opt_twin)
    torch.cuda.synchronize()
    assert int(opt.step_count) == int(opt_twin.step_count) == 3 + 5
    update = opt_twin.flat - start
    assert update.norm() > 0
    assert (opt.flat - opt_twin.flat).norm() <= 1e-3 * update.norm()


# --- timing -------------------------------------------------------------------------------------------------


def _time_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def test_timing_at_sd15_unet_size(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints ms per update for 860 M parameters in 686 tensors (no assertion): the kernel's launch shapes, the
    update replayed from a CUDA graph, the torch backend and bitsandbytes' AdamW8bit on the same tensors."""
    sizes = [(1280, 1953)] * 343 + [(1280,)] * 343
    params = [torch.nn.Parameter(torch.empty(s, device=CUDA).normal_(0, 0.02)) for s in sizes]
    opt = FlatAdamW8bit(params, lr=1e-5, backend="triton")
    opt.flat_grad.normal_(0, 1e-3)
    n = sum(p.numel() for p in params)
    lines = [
        f"FlatAdamW8bit, {n / 1e6:.0f} M parameters in {len(params)} tensors, {torch.cuda.get_device_name()}:"
    ]

    def report(label: str, ms: float) -> None:
        lines.append(f"  {label:<44} {ms:7.2f} ms/update  ({16 * n / ms / 1e9:6.0f} GB/s at 16 B/param)")

    for rows, warps, direct in (
        (4, 4, True),
        (4, 4, False),
        (2, 2, True),
        (8, 4, True),
        (8, 8, True),
        (16, 8, True),
    ):
        opt.triton_config.rows, opt.triton_config.num_warps, opt.triton_config.direct = rows, warps, direct
        opt.warmup()
        report(f"triton rows={rows} warps={warps} {'direct' if direct else 'bisect'}", _time_ms(opt.update))
    opt.triton_config.rows, opt.triton_config.num_warps, opt.triton_config.direct = 4, 4, True
    opt.warmup()
    no_skip = torch.zeros((), dtype=torch.bool, device=CUDA)

    def clipped_update() -> None:
        opt.update(grad_scale=opt.clip_coefficient(1.0), skip=no_skip)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        clipped_update()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        clipped_update()
    report("CUDA graph: grad norm + clip + update", _time_ms(graph.replay))
    tenth = [torch.nn.Parameter(torch.zeros(s, device=CUDA)) for s in sizes[:34] + sizes[343:377]]
    torch_opt = FlatAdamW8bit(tenth, lr=1e-5, backend="torch")
    ms = _time_ms(torch_opt.update, repeats=3) * n / sum(p.numel() for p in tenth)
    report("torch backend (timed on a tenth, scaled)", ms)
    del torch_opt, tenth
    try:
        import bitsandbytes as bnb

        bnb_opt = bnb.optim.AdamW8bit(params, lr=1e-5)
        report("bitsandbytes AdamW8bit (686 tensors)", _time_ms(bnb_opt.step, repeats=5))
    except ImportError:
        lines.append("  bitsandbytes not installed")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
