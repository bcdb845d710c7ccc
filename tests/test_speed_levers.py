"""The speed levers' CPU-visible parts compute what the plain path does: the captured step's packed random draws
give the eager step's batch bit for bit, frozen layers stored in bf16 change nothing under bf16 autocast, and the
training loop's segments between validations and checkpoints cover every step once. (The CUDA graph itself and
the flat optimizer's kernel are checked on a GPU: tests/test_gpu.py, benchmarks/speed.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig as PeftLoraConfig

from stages.lib.config.schema import ComputeConfig, TinyModelConfig, TrackingConfig, TrainConfig
from stages.lib.miniature.tiny_model import build_tiny_pipeline
from stages.lib.tracking.tracker import StageTracker
from stages.lib.training.checkpoints import CheckpointStore
from stages.lib.training.data import ImageSet, encode_latents
from stages.lib.training.finetune import encode_prompt, half_frozen_layers
from stages.lib.training.graphed_step import unpack
from stages.lib.training.trainer import DiffusionTrainer, TrainingData, accelerator_for, segments


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_pipeline(TinyModelConfig(), tmp_path_factory.mktemp("tok"))


def make_trainer(pipe, tmp_path: Path, **options) -> DiffusionTrainer:
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.rand(5, 3, 64, 64, generator=g) * 2 - 1, list("abcde"), [None] * 5)
    data = TrainingData(
        instance=encode_latents(pipe.vae, images),
        instance_embeds=encode_prompt(
            pipe, ["a photo of sks man face in a kitchen", *["a photo of sks"] * 4]
        ),
        instance_weights=torch.rand(5, 1, 16, 16, generator=g) + 0.5,
        class_probe=encode_latents(pipe.vae, images),
        class_embeds=encode_prompt(pipe, "a photo of man face"),
        with_prior=True,
    )
    cfg = TrainConfig(resolution=64, optimizer="adamw", learning_rate=1e-3, train_batch_size=2, **options)
    unet = pipe.unet.requires_grad_(True)
    return DiffusionTrainer(
        cfg,
        unet,
        DDPMScheduler.from_config(pipe.scheduler.config),
        data,
        dict(unet.named_parameters()),
        CheckpointStore(tmp_path / "ckpt", "levers", 1),
        StageTracker("levers", TrackingConfig(enabled=False), tmp_path / "track"),
        accelerator_for(cfg, torch.device("cpu")),
    )


@pytest.mark.parametrize("options", [{}, {"noise_offset": 0.1}], ids=["plain", "offset-noise"])
def test_packed_draws_give_the_eager_batch_bit_for_bit(pipe, tmp_path: Path, options: dict) -> None:
    """What the captured step reads (one float vector per step, unpacked on the device) is the eager batch."""
    trainer = make_trainer(pipe, tmp_path, **options)
    for step in (0, 7, 123):
        draws = trainer._draw(step)
        packed = unpack(draws.pack(), draws)
        assert packed.instance_index.dtype == torch.long
        eager, replayed = trainer._batch(step), trainer._assemble(packed)
        for name in ("noisy", "target", "timesteps", "embeds", "weights"):
            assert torch.equal(getattr(eager, name), getattr(replayed, name)), (step, name)
        assert eager.num_instance == replayed.num_instance == 2
    assert not torch.equal(trainer._batch(0).noisy, trainer._batch(1).noisy)


def test_train_steps_log_every_step_and_learn(pipe, tmp_path: Path) -> None:
    trainer = make_trainer(pipe, tmp_path)
    trainer.train_steps(0, 3)
    trainer.train_steps(3, 40)
    steps = [h["step"] for h in trainer.history]
    assert steps == list(range(1, 41))
    first, last = trainer.history[0], trainer.history[-10:]
    assert {"loss", "instance_loss", "prior_loss", "lr"} <= set(first)
    assert sum(h["loss"] for h in last) / len(last) < first["loss"]
    assert trainer.graph_blocker == "the device is cpu"


def test_segments_cover_every_step_once_and_stop_at_boundaries() -> None:
    assert segments(0, 10, 4, 5) == [(0, 4), (4, 5), (5, 8), (8, 10)]
    assert segments(5, 10, 4, 5) == [(5, 8), (8, 10)]  # a resumed run
    assert segments(10, 10, 4) == []
    cut = segments(0, 800, 200, 250)
    assert [b for _, b in cut] == [200, 250, 400, 500, 600, 750, 800]
    assert all(a < b for a, b in cut) and cut[0][0] == 0


def test_frozen_layers_in_bf16_change_nothing_under_bf16_autocast(pipe) -> None:
    unet = pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        PeftLoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 16, 16, generator=g)
        t = torch.tensor([10, 500])
        embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = unet(x, t, embeds).sample
            assert half_frozen_layers(unet, torch.bfloat16) > 10
            after = unet(x, t, embeds).sample
        assert torch.equal(before, after)
        dtypes = {n: p.dtype for n, p in unet.named_parameters()}
        assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n), "trained weights stay fp32"
        assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n), "norms stay fp32"
        assert dtypes["conv_in.weight"] == torch.bfloat16
    finally:
        unet.delete_adapters("default") if hasattr(unet, "delete_adapters") else None
        unet.float()


def test_training_attention_turns_cudnn_attention_off_on_cuda_only() -> None:
    from stages.lib.training.finetune import training_attention

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with training_attention(ComputeConfig(), torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled(), "nothing changes off CUDA"
    with training_attention(ComputeConfig(), torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled(), "restored after the block"
    with training_attention(ComputeConfig(cudnn_attention_in_training=True), torch.device("cuda")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
