"""CUDA paths (run on a CUDA machine with `pytest -m gpu`; deselected elsewhere): bitsandbytes 8-bit AdamW,
bf16/fp16 autocast with fp32 master weights, fp16 class-image sampling."""

from __future__ import annotations

import copy
import csv
import warnings

import pytest
import torch
from safetensors.torch import load_file

from stages import dreambooth, lora
from stages.lib.config.loader import load_config
from stages.lib.layout import LORA_WEIGHT_NAME
from stages.lib.training import optim

from .conftest import PROJECT_ROOT
from .training_fixtures import TinyWorld, build_world, tiny_training_cfg

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    assert torch.cuda.is_available(), "the gpu tests need CUDA"
    cfg = load_config(PROJECT_ROOT / "params.yaml")
    cfg.tracking.enabled = False
    cfg.compute.device = "cuda"
    w = build_world(cfg, tmp_path_factory.mktemp("gpu"))
    tiny_training_cfg(w.cfg, steps=40)
    for train in (w.cfg.dreambooth, w.cfg.lora.train):
        train.optimizer = "adamw8bit"
        train.mixed_precision = "bf16"
    return w


@pytest.fixture
def optimizer_types(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = optim.make_optimizer

    def recording(params, cfg, device, **options):
        opt = real(params, cfg, device, **options)
        seen.append(type(opt).__module__ + "." + type(opt).__name__)
        return opt

    monkeypatch.setattr("stages.lib.training.trainer.make_optimizer", recording)
    return seen


def test_dreambooth_bf16_adamw8bit_on_cuda(world: TinyWorld, optimizer_types: list[str]) -> None:
    out = world.root / "db"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 8-bit fallback on CUDA
        metrics = dreambooth.run(world.cfg, world.base_dir, out, world.paths("db"))
    assert optimizer_types == ["stages.lib.training.flat_adamw8bit.FlatAdamW8bit"], optimizer_types
    assert metrics["val_loss"] < 0.5 * metrics["val_loss_start"], metrics
    assert metrics["peak_memory_mb"] > 0
    weights = load_file(out / "unet/diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values()), "fp32 master weights are saved"
    world.cfg.dreambooth.max_train_steps = 40  # keep for the LoRA test


def test_lora_fp16_on_cuda(world: TinyWorld, optimizer_types: list[str]) -> None:
    db = world.root / "db"
    if not db.exists():
        dreambooth.run(world.cfg, world.base_dir, db, world.paths("db"))
    cfg = copy.deepcopy(world.cfg)
    cfg.lora.train.mixed_precision = "fp16"
    metrics = lora.run(cfg, 4, db, world.root / "lora4", world.paths("lora4"))
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    assert metrics["val_loss"] <= metrics["val_loss_start"]
    assert (world.root / "lora4" / LORA_WEIGHT_NAME).is_file()


def test_infer_fp16_on_cuda_is_seeded(world: TinyWorld) -> None:
    from stages import infer

    db = world.root / "db"
    if not db.exists():
        dreambooth.run(world.cfg, world.base_dir, db, world.paths("db"))
    cfg = copy.deepcopy(world.cfg)
    cfg.lora.ranks, cfg.lora.rank = [4], 4
    if not (world.root / "lora" / "r4").exists():
        lora.run(cfg, 4, db, world.root / "lora" / "r4", world.paths("lora4b"))
    cfg.infer.prompts, cfg.infer.num_inference_steps = cfg.infer.prompts[:2], 5
    outs = []
    for name in ("a", "b"):
        paths = infer.InferPaths(world.base_dir, db, world.root / "lora", None, world.root / f"infer_{name}",
                                 world.root / f"reports_{name}")  # fmt: skip
        infer.run(cfg, paths)
        outs.append(sorted((world.root / f"infer_{name}").rglob("*.png")))
    assert outs[0] and [p.name for p in outs[0]] == [p.name for p in outs[1]]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*outs, strict=True)), "same seed, same images"


def test_bitsandbytes_when_the_flat_optimizer_is_off(world: TinyWorld, optimizer_types: list[str]) -> None:
    cfg = copy.deepcopy(world.cfg)
    cfg.compute.flat_optimizer = False
    cfg.dreambooth.max_train_steps = 5
    dreambooth.run(cfg, world.base_dir, world.root / "db_bnb", world.paths("db_bnb"))
    assert optimizer_types and optimizer_types[0].startswith("bitsandbytes"), optimizer_types


def _trained(
    world: TinyWorld, name: str, compute: dict, steps: int = 30, **train: object
) -> tuple[dict, dict]:
    cfg = copy.deepcopy(world.cfg)
    for key, value in compute.items():
        setattr(cfg.compute, key, value)
    for key, value in train.items():
        setattr(cfg.dreambooth, key, value)
    cfg.dreambooth.max_train_steps = steps
    cfg.dreambooth.checkpointing_steps = 10
    out = world.root / name
    metrics = dreambooth.run(cfg, world.base_dir, out, world.paths(name))
    losses = {
        int(r["step"]): float(r["loss"])
        for r in csv.DictReader((world.root / "reports" / name / "loss.csv").open())
    }
    return load_file(out / "unet/diffusion_pytorch_model.safetensors"), {"metrics": metrics, "losses": losses}


def test_captured_step_trains_like_the_eager_step(world: TinyWorld) -> None:
    """The CUDA-graph step (flat 8-bit AdamW) against the eager step with the same flat optimizer and against
    bitsandbytes: the same first loss on the same batch (bf16 tolerance), the same weights after 30 steps up to
    the optimizers' 8-bit rounding."""
    base = load_file(world.base_dir / "unet/diffusion_pytorch_model.safetensors")
    graphed, g = _trained(world, "graphed", {})
    eager_flat, ef = _trained(world, "eager_flat", {"cuda_graphs": False})
    eager_bnb, eb = _trained(world, "eager_bnb", {"cuda_graphs": False, "flat_optimizer": False})
    assert sorted(g["losses"]) == list(range(1, 31))
    assert g["losses"][1] == pytest.approx(ef["losses"][1], rel=2e-2)
    assert g["losses"][1] == pytest.approx(eb["losses"][1], rel=2e-2)

    def rel(a: dict, b: dict) -> float:
        diff = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
        update = sum(float((b[k].float() - base[k].float()).norm() ** 2) for k in b) ** 0.5
        return diff / update

    assert rel(graphed, eager_flat) < 0.05, "graph capture changes no arithmetic beyond bf16 noise"
    assert rel(graphed, eager_bnb) < 0.25, "flat 8-bit AdamW tracks bitsandbytes' AdamW8bit"
    assert g["metrics"]["val_loss"] < g["metrics"]["val_loss_start"]


def test_captured_step_with_gradient_checkpointing(
    world: TinyWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """Gradient checkpointing stays inside the captured step and changes nothing beyond bf16 noise."""
    base = load_file(world.base_dir / "unet/diffusion_pytorch_model.safetensors")
    with caplog.at_level("INFO", logger="stages"):
        checkpointed, c = _trained(world, "graphed_gc", {}, gradient_checkpointing=True)
    assert "training step captured as a CUDA graph" in caplog.text
    plain, p = _trained(world, "graphed_no_gc", {})
    assert c["losses"][1] == pytest.approx(p["losses"][1], rel=1e-3)
    diff = sum(float((checkpointed[k].float() - plain[k].float()).norm() ** 2) for k in plain) ** 0.5
    update = sum(float((plain[k].float() - base[k].float()).norm() ** 2) for k in plain) ** 0.5
    assert diff < 0.05 * update


def test_captured_step_refuses_a_non_finite_loss(world: TinyWorld) -> None:
    from stages.lib.training.trainer import NonFiniteLossError

    cfg = copy.deepcopy(world.cfg)
    cfg.dreambooth.learning_rate = 1e30
    cfg.dreambooth.max_grad_norm = 0.0
    cfg.dreambooth.max_train_steps = 20
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step"):
        dreambooth.run(cfg, world.base_dir, world.root / "nan", world.paths("nan"))
    assert not (world.root / "nan").exists()


def test_lora_extraction_on_the_gpu_matches_the_cpu(world) -> None:
    """convert's SVDs run on the stage's device: the same factors' product and error as on the CPU."""
    from stages.lib.models.loading import load_pipeline
    from stages.lib.models.lora_extract import extract_lora

    base = load_pipeline(world.base_dir).unet
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    on_cpu = extract_lora(base, tuned, targets, rank=4)
    on_gpu = extract_lora(base, tuned, targets, rank=4, device="cuda")
    assert on_gpu.layers.keys() == on_cpu.layers.keys()
    for key in on_cpu.layers:
        assert on_gpu.layers[key].device.type == "cpu"
    for name in on_cpu.errors:
        up, down = f"{name}.lora.up.weight", f"{name}.lora.down.weight"
        gpu_product = on_gpu.layers[up] @ on_gpu.layers[down]
        cpu_product = on_cpu.layers[up] @ on_cpu.layers[down]
        assert torch.allclose(gpu_product, cpu_product, atol=1e-5, rtol=1e-4), name
    assert abs(on_gpu.relative_error - on_cpu.relative_error) < 1e-5


def test_checkpoint_snapshot_is_the_state_at_its_step(tmp_path) -> None:
    """CUDA tensors are copied into one reused pinned buffer without a host wait: training that goes on after the
    checkpoint call does not leak into it, and the files hold compact tensors."""
    from stages.lib.training.checkpoints import CheckpointState, CheckpointStore

    store = CheckpointStore(tmp_path, "pinned", 2)
    weights = {"a": torch.randn(1000, 257, device="cuda"), "b": torch.randn(3, device="cuda").bfloat16()}
    states = {"state": {"q": torch.randint(0, 255, (777,), dtype=torch.uint8, device="cuda")}, "step": 3}
    buffers = []
    for step in (1, 2):
        expected = {k: v.cpu() for k, v in weights.items()}, states["state"]["q"].cpu()
        written = store.save_in_background(CheckpointState(step, weights, states, {"last_epoch": step}, {}))
        for t in (*weights.values(), states["state"]["q"]):
            t.add_(1)  # the next training steps, queued right behind the copies
        buffers.append(store._pinned.buffer.data_ptr())
        store.wait()
        loaded = CheckpointStore.load(written.result())
        assert all(torch.equal(loaded.tensors[k], expected[0][k]) for k in weights)
        assert torch.equal(loaded.optimizer["state"]["q"], expected[1])
        assert loaded.optimizer["step"] == 3 and loaded.lr_scheduler == {"last_epoch": step}
        assert (written.result() / "optimizer.pt").stat().st_size < 100_000, (
            "the shared buffer is not written"
        )
    assert buffers[0] == buffers[1], "the second checkpoint reuses the first one's pinned buffer"


def test_validation_sampling_replays_cuda_graphs_of_the_eager_unet(world: TinyWorld) -> None:
    """Through Accelerate's bf16 wrapper, as the trainer prepares the UNet: the replayed forward equals the eager
    one, also after the weights change in place (training between two rounds); validation images through it equal
    the eager ones; the wrapper is back afterwards."""
    import numpy as np

    from stages.lib.models.loading import load_pipeline
    from stages.lib.training.finetune import sample_validation
    from stages.lib.training.graphed_denoiser import GraphedDenoiser, graphed_sampling
    from stages.lib.training.trainer import accelerator_for

    pipe = load_pipeline(world.base_dir).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    cfg, prompt = world.cfg.dreambooth, world.cfg.data.instance_prompt
    pipe.unet = accelerator_for(cfg, torch.device("cuda")).prepare(pipe.unet)
    unet, wrapper = pipe.unet, pipe.unet.forward
    denoiser = GraphedDenoiser(unet)
    g = torch.Generator("cuda").manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(4, unet.config.in_channels, size, size, device="cuda", generator=g)
    text = torch.randn(4, 77, unet.config.cross_attention_dim, device="cuda", generator=g)
    t = torch.tensor(500, device="cuda")

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            eager = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
            with graphed_sampling(unet, denoiser):
                unet(
                    x, t, encoder_hidden_states=text, return_dict=False
                )  # first call of a shape: eager, captured
                replayed = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
        return eager, replayed

    before = outputs()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, device=p.device, generator=g) * p.abs().mean())  # like a step
    after = outputs()
    assert denoiser.failed is None and len(denoiser.graphs) == 1, (denoiser.failed, list(denoiser.graphs))
    for eager, replayed in (before, after):
        assert replayed.dtype == eager.dtype == torch.float32, "Accelerate's fp32 outputs are kept"
        assert torch.allclose(replayed, eager, rtol=1e-3, atol=1e-3), float((replayed - eager).abs().max())
    assert (after[1] - before[1]).abs().mean() > 100 * (after[1] - after[0]).abs().mean().clamp_min(1e-6), (
        "the replay after the weight change computes with the new weights"
    )

    def pixels(graphed: bool) -> np.ndarray:
        with graphed_sampling(unet, denoiser if graphed else None):
            images = sample_validation(pipe, cfg, prompt)
        return np.stack([np.asarray(im, dtype=np.float32) for im in images])

    eager_images, graphed_images = pixels(graphed=False), pixels(graphed=True)
    worst = np.abs(eager_images - graphed_images).max()
    assert worst <= 2, f"same kernels: the same images within a grey level or two (off by {worst})"
    assert pipe.unet.forward == wrapper, "Accelerate's forward is restored after sampling"
    denoiser.release()


def test_training_runs_without_cudnn_attention_and_restores_it(world: TinyWorld, monkeypatch) -> None:
    """compute.cudnn_attention_in_training=false (the default): training and validation without cuDNN's fused
    attention, the process's setting back afterwards; true leaves cuDNN's attention on."""
    from stages.lib.training.trainer import DiffusionTrainer

    seen: list[bool] = []
    real = DiffusionTrainer.run

    def spy(self):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(self)

    monkeypatch.setattr(DiffusionTrainer, "run", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    for allowed in (False, True):
        cfg = copy.deepcopy(world.cfg)
        cfg.dreambooth.max_train_steps = 4
        cfg.compute.cudnn_attention_in_training = allowed
        metrics = dreambooth.run(
            cfg, world.base_dir, world.root / f"db_cudnn_{allowed}", world.paths(f"cudnn{allowed}")
        )
        assert torch.isfinite(torch.tensor(metrics["final_loss"]))
        assert torch.backends.cuda.cudnn_sdp_enabled(), "restored after the stage's training"
    assert seen == [False, True], seen
