"""SD1.5-size benchmark: the project's training step and class-image sampling against plain diffusers code,
measured in the same run on the same GPU, printed as ratios.

Baseline = what diffusers' train_dreambooth.py does per step (VAE encode of the pixel batch and text-encoder
forward every step, bf16 autocast, bitsandbytes AdamW8bit) and a plain pipeline call for sampling.
Project = stages.lib.training.DiffusionTrainer (cached latents and embeddings) and stages.class_images.generate.
Random weights with the real SD1.5 configs (stages/lib/sd15_configs); nothing is downloaded.

    python benchmarks/train_step.py --steps 30 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig as PeftLoraConfig
from transformers import CLIPTextConfig, CLIPTextModel

from stages.lib.checkpoints import CheckpointStore
from stages.lib.finetune import encode_prompt, prompt_ids
from stages.lib.models import SD15_CONFIG_DIR
from stages.lib.optim import make_optimizer
from stages.lib.schema import TrackingConfig, TrainConfig
from stages.lib.tokenizer import build_clip_tokenizer
from stages.lib.tracking import StageTracker
from stages.lib.train_data import ImageSet, encode_latents
from stages.lib.training import DiffusionTrainer, TrainingData, accelerator_for

RES = 512


def sd15_pipeline(work: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    sched = PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=build_clip_tokenizer(work / "tok"),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def timed(step: Callable[[int], None], steps: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"step_s": dt, "it_per_s": 1 / dt, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}


def baseline_step_fn(
    pipe, cfg: TrainConfig, pixels: torch.Tensor, ids: torch.Tensor, params
) -> Callable[[int], None]:
    """diffusers' train_dreambooth.py, one instance + one class example per step."""
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = make_optimizer(params, cfg, torch.device("cuda"))

    def step(i: int) -> None:
        with torch.no_grad():
            latents = (
                pipe.vae.encode(pixels.to(torch.bfloat16)).latent_dist.sample()
                * pipe.vae.config.scaling_factor
            )
            embeds = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = pipe.unet(sched.add_noise(latents, noise, t), t, embeds).sample
        inst, prior = (
            torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="none")
            .mean((1, 2, 3))
            .chunk(2)
        )
        (inst.mean() + prior.mean()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def project_step_fn(
    pipe, cfg: TrainConfig, images: ImageSet, work: Path, params: dict
) -> Callable[[int], None]:
    data = TrainingData(
        instance=encode_latents(pipe.vae, images),
        instance_embeds=encode_prompt(pipe, "a photo of sks man face"),
        class_probe=encode_latents(pipe.vae, images),
        class_embeds=encode_prompt(pipe, "a photo of man face"),
        with_prior=True,
    )
    trainer = DiffusionTrainer(
        cfg,
        pipe.unet,
        DDPMScheduler.from_config(pipe.scheduler.config),
        data,
        params,
        CheckpointStore(work / "ckpt", "bench", 1),
        StageTracker("bench", TrackingConfig(enabled=False), work),
        accelerator_for(cfg, torch.device("cuda")),
    )
    return trainer.train_step


def run(steps: int, warmup: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp())
    pipe = sd15_pipeline(work).to("cuda")
    pipe.vae.to(torch.bfloat16).requires_grad_(False)
    pipe.text_encoder.to(torch.bfloat16).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.rand(4, 3, RES, RES, generator=g) * 2 - 1, [str(i) for i in range(4)], [None] * 4)
    pixels = images.pixels[:2].cuda()
    ids = torch.cat([prompt_ids(pipe, "a photo of sks man face"), prompt_ids(pipe, "a photo of man face")])
    results: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    db = TrainConfig(max_train_steps=10_000, checkpointing_steps=10**9, validation_steps=10**9)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    pipe.unet.requires_grad_(True)
    params = dict(pipe.unet.named_parameters())
    results["db_baseline"] = timed(
        baseline_step_fn(pipe, db, pixels, ids, list(params.values())), steps, warmup
    )
    pipe.unet.load_state_dict(state)
    results["db_project"] = timed(project_step_fn(pipe, db, images, work, params), steps, warmup)

    pipe.unet.load_state_dict(state)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(
        PeftLoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    lora_params = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    lr = TrainConfig(
        learning_rate=5e-4, max_train_steps=10_000, checkpointing_steps=10**9, validation_steps=10**9
    )
    results["lora_r4_baseline"] = timed(
        baseline_step_fn(pipe, lr, pixels, ids, list(lora_params.values())), steps, warmup
    )
    results["lora_r4_project"] = timed(project_step_fn(pipe, lr, images, work, lora_params), steps, warmup)
    pipe.unet.unload_lora() if hasattr(pipe.unet, "unload_lora") else None
    for name in ("db", "lora_r4"):
        results[f"{name}_speedup"] = (
            results[f"{name}_project"]["it_per_s"] / results[f"{name}_baseline"]["it_per_s"]
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = run(args.steps, args.warmup)
    print(json.dumps(results, indent=1))
    for name in ("db", "lora_r4"):
        b, p = results[f"{name}_baseline"], results[f"{name}_project"]
        print(
            f"{name}: baseline {b['it_per_s']:.2f} it/s ({b['peak_GiB']:.1f} GiB) | project {p['it_per_s']:.2f} it/s "
            f"({p['peak_GiB']:.1f} GiB) | ratio {results[f'{name}_speedup']:.2f}x"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
