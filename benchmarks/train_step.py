"""Training-step benchmark: the project's DreamBooth and LoRA step against plain diffusers code, measured in the
same run on the same device, printed as ratios.

Baseline = what diffusers' train_dreambooth.py does per step (VAE encode of the pixel batch and text-encoder
forward every step; on CUDA bf16 autocast and bitsandbytes AdamW8bit, on the CPU fp32 and torch's AdamW with its
defaults) and logs the loss to MLflow every step, as accelerate's MLflow tracker does (``--no-mlflow``: neither
side logs; for hosts without MLflow).
Project = stages.lib.training.trainer.DiffusionTrainer (cached latents and embeddings, fused AdamW where 8-bit cannot run,
MLflow step metrics in batches) with its StageTracker.
Random weights, nothing downloaded: ``--model sd15`` the real SD1.5 configs (stages/lib/models/sd15_configs) at 512 px on
CUDA; ``--model tiny`` the embedded default's architecture at 64 px, on the CPU by default.

    python benchmarks/train_step.py --steps 30 --out bench.json           # SD1.5 size, CUDA
    python benchmarks/train_step.py --model tiny --steps 200 --warmup 20  # the tiny default, CPU
    python -m benchmarks.train_step --table benchmarks/results_h200.json   # docs/gpu.md's table from a result
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
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

from stages.lib.config.schema import TinyModelConfig, TrackingConfig, TrainConfig
from stages.lib.miniature.tiny_model import build_tiny_pipeline
from stages.lib.models.loading import SD15_CONFIG_DIR
from stages.lib.models.tokenizer import build_clip_tokenizer
from stages.lib.tracking.tracker import StageTracker
from stages.lib.training.checkpoints import CheckpointStore
from stages.lib.training.data import ImageSet, encode_latents
from stages.lib.training.finetune import encode_prompt, prompt_ids
from stages.lib.training.optim import make_optimizer
from stages.lib.training.trainer import DiffusionTrainer, TrainingData, accelerator_for

RESOLUTION = {"sd15": 512, "tiny": 64}
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks man face", "a photo of man face"


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


def timed(step: Callable[[int], None], steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    cuda = device.type == "cuda"
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
    return {"step_s": dt, "it_per_s": 1 / dt, "peak_GiB": peak}


def baseline_step_fn(
    pipe, cfg: TrainConfig, pixels: torch.Tensor, ids: torch.Tensor, params, log: Callable[..., object] | None
) -> Callable[[int], None]:
    """diffusers' train_dreambooth.py, one instance + one class example per step, the loss logged every step."""
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    device = pipe.unet.device
    cuda = device.type == "cuda"
    opt = make_optimizer(params, cfg, device) if cuda else torch.optim.AdamW(params, lr=cfg.learning_rate)
    dtype = torch.bfloat16 if cuda else torch.float32

    def step(i: int) -> None:
        with torch.no_grad():
            latents = pipe.vae.encode(pixels.to(dtype)).latent_dist.sample() * pipe.vae.config.scaling_factor
            embeds = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = pipe.unet(sched.add_noise(latents, noise, t), t, embeds).sample
        inst, prior = (
            torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="none")
            .mean((1, 2, 3))
            .chunk(2)
        )
        loss = inst.mean() + prior.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs = {"loss": loss.detach().item(), "lr": cfg.learning_rate}  # train_dreambooth.py's progress bar
        if log is not None:
            log(logs, step=i)

    return step


def project_step_fn(
    pipe, cfg: TrainConfig, images: ImageSet, work: Path, params: dict, tracker: StageTracker
) -> Callable[[int], None]:
    """The project's step: DiffusionTrainer over cached latents and prompt embeddings, logging to ``tracker``."""
    data = TrainingData(
        instance=encode_latents(pipe.vae, images),
        instance_embeds=encode_prompt(pipe, INSTANCE_PROMPT),
        class_probe=encode_latents(pipe.vae, images),
        class_embeds=encode_prompt(pipe, CLASS_PROMPT),
        with_prior=True,
    )
    trainer = DiffusionTrainer(
        cfg,
        pipe.unet,
        DDPMScheduler.from_config(pipe.scheduler.config),
        data,
        params,
        CheckpointStore(work / "ckpt", "bench", 1),
        tracker,
        accelerator_for(cfg, pipe.unet.device),
    )

    def step(i: int) -> None:
        tracker.log_metrics(trainer.train_step(i), step=i)  # what DiffusionTrainer.run does each step

    return step


def compare(
    name: str, pipe, cfg: TrainConfig, images: ImageSet, params: dict, work: Path, steps: int, warmup: int,
    use_mlflow: bool,
) -> dict[str, object]:  # fmt: skip
    """Baseline and project step on the same weights (restored in between), each logging to its MLflow run."""
    device = pipe.unet.device
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pixels = images.pixels[:2].to(device)
    ids = torch.cat([prompt_ids(pipe, INSTANCE_PROMPT), prompt_ids(pipe, CLASS_PROMPT)])
    tracking = TrackingConfig(
        enabled=use_mlflow, uri=f"sqlite:///{work / 'mlflow.db'}", experiment_name="bench"
    )
    baseline_log = None
    if use_mlflow:
        import mlflow

        mlflow.set_tracking_uri(tracking.uri)
        mlflow.set_experiment(tracking.experiment_name)
        mlflow.start_run(run_name=f"{name} baseline")
        baseline_log = mlflow.log_metrics
    try:
        baseline = timed(baseline_step_fn(pipe, cfg, pixels, ids.to(device), list(params.values()), baseline_log),
                         steps, warmup, device)  # fmt: skip
    finally:
        if use_mlflow:
            mlflow.end_run()
    pipe.unet.load_state_dict(state)
    tracker = StageTracker(f"{name} project", tracking, work / name)
    tracker.start({})
    try:
        project = timed(project_step_fn(pipe, cfg, images, work, params, tracker), steps, warmup, device)
    finally:
        tracker.finish("FINISHED")
    pipe.unet.load_state_dict(state)
    return {f"{name}_baseline": baseline, f"{name}_project": project,
            f"{name}_speedup": project["it_per_s"] / baseline["it_per_s"]}  # fmt: skip


def run(model: str, device: torch.device, steps: int, warmup: int, use_mlflow: bool) -> dict[str, object]:
    work = Path(tempfile.mkdtemp())
    pipe = sd15_pipeline(work) if model == "sd15" else build_tiny_pipeline(TinyModelConfig(), work / "tok")
    pipe.to(device)
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe.vae.to(frozen_dtype).requires_grad_(False)
    pipe.text_encoder.to(frozen_dtype).requires_grad_(False)
    res = RESOLUTION[model]
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.rand(4, 3, res, res, generator=g) * 2 - 1, [str(i) for i in range(4)], [None] * 4)
    results: dict[str, object] = {
        "model": model,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "mlflow_logging": use_mlflow,
    }
    never = {"max_train_steps": 10_000, "checkpointing_steps": 10**9, "validation_steps": 10**9}
    lr = 2e-6 if model == "sd15" else 4e-4
    pipe.unet.requires_grad_(True)
    db = TrainConfig(resolution=res, learning_rate=lr, **never)
    results |= compare(
        "db", pipe, db, images, dict(pipe.unet.named_parameters()), work, steps, warmup, use_mlflow
    )

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
    lora = TrainConfig(resolution=res, learning_rate=5e-4, **never)
    results |= compare("lora_r4", pipe, lora, images, lora_params, work, steps, warmup, use_mlflow)
    return results


def render_table(results: dict) -> str:
    """A results JSON as the Markdown table docs/gpu.md shows: steps/s and peak memory of both sides, and the ratio."""
    lines = [
        f"{results['model']} on {results['device']}, torch {results['torch']}",
        "",
        "| step | plain diffusers it/s | project it/s | ratio | peak GiB (plain / project) |",
        "|---|---|---|---|---|",
    ]
    for name, title in (("db", "DreamBooth, batch 1 + 1 prior"), ("lora_r4", "LoRA r4, batch 1 + 1 prior")):
        b, p = results[f"{name}_baseline"], results[f"{name}_project"]
        memory = " / ".join(f"{r['peak_GiB']:.1f}" if math.isfinite(r["peak_GiB"]) else "-" for r in (b, p))
        lines.append(
            f"| {title} | {b['it_per_s']:.2f} | {p['it_per_s']:.2f} | {results[f'{name}_speedup']:.2f}x | {memory} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(RESOLUTION), default="sd15")
    parser.add_argument("--device", help="default: cuda for sd15, cpu for tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-mlflow", action="store_true", help="neither side logs step metrics")
    parser.add_argument("--table", type=Path, help="print a results JSON as a Markdown table and stop")
    args = parser.parse_args()
    if args.table:
        print(render_table(json.loads(args.table.read_text())), end="")
        return
    device = torch.device(args.device or ("cuda" if args.model == "sd15" else "cpu"))
    with warnings.catch_warnings():  # on the CPU the 8-bit AdamW fallback warns at every optimizer it builds
        warnings.simplefilter("ignore", RuntimeWarning)
        results = run(args.model, device, args.steps, args.warmup, not args.no_mlflow)
    print(json.dumps(results, indent=1))
    for name in ("db", "lora_r4"):
        b, p = results[f"{name}_baseline"], results[f"{name}_project"]
        memory = [f" ({r['peak_GiB']:.1f} GiB)" if math.isfinite(r["peak_GiB"]) else "" for r in (b, p)]
        print(
            f"{name}: baseline {b['it_per_s']:.2f} it/s{memory[0]} | project {p['it_per_s']:.2f} it/s{memory[1]} "
            f"| ratio {results[f'{name}_speedup']:.2f}x"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
