"""The one training loop behind DreamBooth, LoRA (and the ControlNet trainer): prior preservation, cached
latents and text embeddings, checkpoints that resume after kill -9, probe losses and validation images.

Randomness is drawn from a generator seeded by (seed, step), so a resumed run draws exactly what an uninterrupted
run would, and the same config gives bit-identical weights on CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from stages.lib.config.schema import ComputeConfig, TrainConfig
from stages.lib.errors import StageError
from stages.lib.runtime.timings import phase
from stages.lib.tracking.tracker import StageTracker
from stages.lib.training.checkpoints import CheckpointState, CheckpointStore
from stages.lib.training.data import LatentCache
from stages.lib.training.flat_adamw8bit import FlatAdamW8bit
from stages.lib.training.graphed_step import GraphedStep, StepDraw
from stages.lib.training.losses import diffusion_target, min_snr_weights, per_sample_mse, sample_noise
from stages.lib.training.optim import make_lr_scheduler, make_optimizer

log = logging.getLogger(__name__)
PROBE_TIMESTEPS = 8


class NonFiniteLossError(StageError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainingData:
    """Everything the hot loop reads, already on the device: latents, face maps, prompt embeddings."""

    instance: LatentCache
    instance_embeds: torch.Tensor  # (1, 77, D) one prompt, or (N, 77, D) one caption per instance image
    instance_weights: torch.Tensor | None = None  # (N, 1, h, w) face maps, mean 1
    class_probe: LatentCache | None = None  # class images: the prior-preservation term and the class probe
    class_embeds: torch.Tensor | None = None
    with_prior: bool = False  # train on the class images too (prior preservation)
    holdout: LatentCache | None = None
    holdout_embeds: torch.Tensor | None = None  # the held-out images' prompts, like instance_embeds
    text_encoder: torch.nn.Module | None = None  # set when the text encoder trains: embeddings every step
    instance_ids: torch.Tensor | None = None  # (1 or N, 77) token ids, used with text_encoder
    class_ids: torch.Tensor | None = None
    holdout_ids: torch.Tensor | None = None
    # Per-row conditioning images of the "instance", "class" and "holdout" sets, (N, C, H, W) aligned with their
    # latents (ControlNet maps); when set, the denoiser is called with ``controlnet_cond``.
    cond: dict[str, torch.Tensor] = field(default_factory=dict)

    def _prompt(self, kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(cached embeddings, token ids) of ``kind``: "instance", "class" or "holdout"."""
        if kind == "holdout":
            return self.holdout_embeds, self.holdout_ids
        if kind == "class":
            return self.class_embeds, self.class_ids
        return self.instance_embeds, self.instance_ids

    def has_prompt(self, kind: str) -> bool:
        """Whether ``kind`` has prompt embeddings (cached, or from the trained text encoder), without computing them."""
        cached, ids = self._prompt(kind)
        return cached is not None or (self.text_encoder is not None and ids is not None)

    def embeds(self, kind: str) -> torch.Tensor | None:
        """Prompt embeddings of ``kind``: cached, or fresh from the trained text encoder."""
        cached, ids = self._prompt(kind)
        if self.text_encoder is None or ids is None:
            return cached
        return self.text_encoder(ids)[0]

    def rows(self, kind: str, index: torch.Tensor) -> torch.Tensor | None:
        """The prompt embeddings of the images ``index`` of ``kind``: per-image captions or one shared prompt."""
        _, ids = self._prompt(kind)
        if self.text_encoder is not None and ids is not None and ids.shape[0] > 1:
            return self.text_encoder(ids[index.to(ids.device)])[0]  # per-image captions: encode this batch's
        embeds = self.embeds(kind)
        if embeds is None:
            return None
        if embeds.shape[0] > 1:
            return embeds[index.to(embeds.device)]
        return embeds.expand(index.shape[0], -1, -1)

    @property
    def prior(self) -> LatentCache | None:
        """The class latents the loss trains on, if prior preservation is on."""
        return self.class_probe if self.with_prior else None


@dataclass
class Batch:
    """One step's inputs; rows [:num_instance] are instance examples, the rest prior (class) examples."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    weights: torch.Tensor | None
    num_instance: int
    cond: torch.Tensor | None = None  # per-row conditioning images (ControlNet), rows as above

    def shard(self, rank: int, world: int) -> Batch:
        """This process's rows of a global batch: its slice of the instance rows and of the prior rows."""
        if world == 1:
            return self
        per = self.num_instance // world
        rows = torch.arange(rank * per, (rank + 1) * per, device=self.noisy.device)
        if self.noisy.shape[0] > self.num_instance:
            rows = torch.cat([rows, rows + self.num_instance])

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows]

        return Batch(
            pick(self.noisy),
            pick(self.target),
            pick(self.timesteps),
            pick(self.embeds),
            pick(self.weights),
            per,
            pick(self.cond),
        )


@dataclass
class TrainResult:
    """Final step, per-step loss history (for dvc plots) and summary metrics."""

    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def denoise(
    model: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoiser's prediction: a UNet, or any module taking ``controlnet_cond`` when rows are conditioned
    (e.g. :class:`stages.lib.models.controlnet_model.ControlledUNet`, a ControlNet steering a frozen UNet)."""
    extra = {} if cond is None else {"controlnet_cond": cond}
    return model(noisy, timesteps, embeds, **extra).sample


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step: independent of how the run was split by interruptions."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def segments(start: int, total: int, *every: int) -> list[tuple[int, int]]:
    """``[start, total)`` cut at the multiples of each of ``every`` (validation and checkpoint steps)."""
    if start >= total:
        return []
    cuts = sorted({total, *(s for n in every for s in range(n, total, n) if s > start)})
    bounds = [start, *cuts]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def accelerator_for(cfg: TrainConfig, device: torch.device) -> Accelerator:
    """bf16/fp16 autocast with fp32 master weights on CUDA; plain fp32 on CPU."""
    mixed = cfg.mixed_precision if device.type == "cuda" else "no"
    # Accelerate keeps one global state per process; a later run in the same process (tests, notebooks) may
    # ask for another precision. The distributed (partial) state is kept.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")


def graph_blocker(
    cfg: TrainConfig,
    compute: ComputeConfig,
    device: torch.device,
    world: int,
    optimizer: torch.optim.Optimizer,
) -> str | None:
    """Why the training step cannot run as one CUDA graph here, or None when it can."""
    reasons = [
        (device.type != "cuda", f"the device is {device.type}"),
        (not compute.cuda_graphs, "compute.cuda_graphs is false"),
        (world > 1, f"{world} processes (graphs serve one process)"),
        (cfg.mixed_precision == "fp16", "fp16 mixed precision needs a loss scaler (use bf16)"),
        (cfg.train_text_encoder, "the text encoder trains"),
        (not isinstance(optimizer, FlatAdamW8bit), f"optimizer={cfg.optimizer} (needs the flat adamw8bit)"),
    ]
    return next((why for blocked, why in reasons if blocked), None)


class DiffusionTrainer:
    """Trains ``params`` (a named subset of the UNet's parameters, or all of them) on ``data``."""

    def __init__(
        self,
        cfg: TrainConfig,
        unet: torch.nn.Module,
        noise_scheduler: DDPMScheduler,
        data: TrainingData,
        params: dict[str, torch.nn.Parameter],
        store: CheckpointStore,
        tracker: StageTracker,
        accelerator: Accelerator,
        validate_images: Callable[[int], None] | None = None,
        compute: ComputeConfig | None = None,
    ) -> None:
        self.cfg, self.unet, self.scheduler, self.data = cfg, unet, noise_scheduler, data
        self.params, self.store, self.tracker, self.acc = params, store, tracker, accelerator
        self.validate_images = validate_images
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        compute = compute or ComputeConfig()
        flat = compute.flat_optimizer and self.world == 1  # make_optimizer uses it on CUDA only
        self.optimizer = make_optimizer(params.values(), cfg, self.device, flat=flat)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, cfg)
        self.ema = EMAModel(list(params.values()), decay=cfg.ema_decay, foreach=True) if cfg.use_ema else None
        self.graph_blocker = graph_blocker(cfg, compute, self.device, self.world, self.optimizer)
        self.graphed: GraphedStep | None = None
        if data.text_encoder is not None:
            data.text_encoder = accelerator.prepare(data.text_encoder)
        if self.graph_blocker is not None:  # else one process in bf16 or fp32: nothing for accelerate to wrap
            if self.device.type == "cuda":
                log.info("training step not captured as a CUDA graph: %s", self.graph_blocker)
            self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(
                self.unet, self.optimizer, self.lr_scheduler
            )
        self.history: list[dict[str, float]] = []
        self.validation: list[dict[str, float]] = []

    # -- one step -------------------------------------------------------------------------------------------
    def _draw(self, step: int) -> StepDraw:
        """The random draws of one step's global batch (train_batch_size per process), on the host.

        Every process draws the same global batch from the step's generator and keeps its own rows, so N
        processes of batch b train like one process of batch N*b.
        """
        g = step_generator(self.cfg.seed, step)
        bs = self.cfg.train_batch_size * self.world
        inst = torch.randint(len(self.data.instance), (bs,), generator=g)
        prior = None
        caches = [self.data.instance]
        if self.data.prior is not None:
            prior = torch.randint(len(self.data.prior), (bs,), generator=g)
            caches.append(self.data.prior)
        latent_noise = [torch.randn((bs, *cache.mean.shape[1:]), generator=g) for cache in caches]
        rows = bs * len(caches)
        noise = sample_noise((rows, *latent_noise[0].shape[1:]), g, self.cfg.noise_offset)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (rows,), generator=g)
        return StepDraw(inst, prior, latent_noise, noise, t)

    def _assemble(self, d: StepDraw) -> Batch:
        """The batch of draws ``d`` (on the device): instance rows first, then prior rows."""
        bs = d.instance_index.shape[0]
        parts = [(self.data.instance, d.instance_index, "instance")]
        if d.prior_index is not None:
            parts.append((self.data.prior, d.prior_index, "class"))
        latents, embeds = [], []
        for (cache, idx, kind), latent_noise in zip(parts, d.latent_noise, strict=True):
            latents.append(cache.sample(idx, latent_noise))
            embeds.append(self.data.rows(kind, idx))
        x0 = torch.cat(latents)
        weights = None
        if self.data.instance_weights is not None:
            ones = torch.ones((x0.shape[0] - bs, *self.data.instance_weights.shape[1:]), device=x0.device)
            weights = torch.cat([self.data.instance_weights[d.instance_index], ones])
        cond = None
        if self.data.cond:  # the conditioning image of each drawn row: no extra random draws
            rows = [self.data.cond["instance"][d.instance_index]]
            if d.prior_index is not None:
                rows.append(self.data.cond["class"][d.prior_index])
            cond = torch.cat(rows)
        return Batch(
            noisy=self.scheduler.add_noise(x0, d.noise, d.timesteps),
            target=diffusion_target(self.scheduler, x0, d.noise, d.timesteps),
            timesteps=d.timesteps,
            embeds=torch.cat(embeds),
            weights=weights,
            num_instance=bs,
            cond=cond,
        )

    def _batch(self, step: int) -> Batch:
        """The global batch of one step, on the device."""
        return self._assemble(self._draw(step).to(self.device))

    def _loss_terms(self, b: Batch, autocast: AbstractContextManager) -> dict[str, torch.Tensor]:
        """Instance loss, prior loss (with prior preservation) and their weighted sum ``loss`` of batch ``b``."""
        with autocast:
            pred = denoise(self.unet, b.noisy, b.timesteps, b.embeds, b.cond)
        per_sample = per_sample_mse(pred, b.target, b.weights)
        per_sample = per_sample * min_snr_weights(self.scheduler, b.timesteps, self.cfg.snr_gamma)
        instance = per_sample[: b.num_instance].mean()
        losses = {"instance_loss": instance, "loss": instance}
        if per_sample.shape[0] > b.num_instance:
            prior = per_sample[b.num_instance :].mean()
            losses["prior_loss"] = prior
            losses["loss"] = instance + self.cfg.prior_loss_weight * prior
        return losses

    def _losses(self, step: int) -> dict[str, torch.Tensor]:
        return self._loss_terms(self._batch(step).shard(self.rank, self.world), self.acc.autocast())

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step; raises NonFiniteLossError before touching the weights."""
        losses = self._losses(step)
        reported = {k: v.detach().clone() for k, v in losses.items()}
        if self.world > 1:  # global means: every process takes the same NaN decision and logs the same values
            reported = {k: self.acc.reduce(v, "mean") for k, v in reported.items()}
        if not torch.isfinite(reported["loss"]):
            raise self._non_finite(reported["loss"].item(), step + 1, "weights were not updated")
        self.acc.backward(losses["loss"])
        if self.cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(list(self.params.values()))
        record = {k: float(v) for k, v in reported.items()}
        record["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return record

    # -- probes ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def probe_loss(self, cache: LatentCache | None, kind: str, cond_key: str = "") -> float:
        """Denoising loss with fixed noise and timesteps on up to ``num_probes`` images: comparable across steps."""
        if cache is None or not self.data.has_prompt(kind):
            return math.nan
        n = min(self.cfg.num_probes, len(cache))
        embeds = self.data.rows(kind, torch.arange(n).repeat_interleave(PROBE_TIMESTEPS))
        g = torch.Generator().manual_seed(self.cfg.seed + 12345)
        latents = (cache.mean[:n] * cache.scaling_factor).repeat_interleave(PROBE_TIMESTEPS, 0)
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.linspace(steps * 0.05, steps * 0.95, PROBE_TIMESTEPS).long().repeat(n).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = diffusion_target(self.scheduler, latents, noise, t)
        cond = self.data.cond.get(cond_key)  # the cache's conditioning images (ControlNet training)
        cond = None if cond is None else cond[:n].repeat_interleave(PROBE_TIMESTEPS, 0)
        with (
            self.acc.autocast()
        ):  # the unwrapped model: no collective calls, every process gets the same value
            pred = denoise(self.acc.unwrap_model(self.unet), noisy, t, embeds, cond)
        return float(per_sample_mse(pred, target).mean())

    def probes(self) -> dict[str, float]:
        """Instance (held-out or fixed) and class probe losses, in eval mode."""
        d = self.data
        modules = [m for m in (self.unet, d.text_encoder) if m is not None]
        for m in modules:
            m.eval()
        try:
            return self._probe_values(d)
        finally:
            for m in modules:
                m.train()

    def _probe_values(self, d: TrainingData) -> dict[str, float]:
        held = d.holdout is not None
        return {
            "val_loss": self.probe_loss(d.holdout, "holdout", "holdout")
            if held
            else self.probe_loss(d.instance, "instance", "instance"),
            "class_probe_loss": self.probe_loss(d.class_probe, "class", "class"),
        }

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _save(self, step: int) -> None:
        """Checkpoint ``step``: snapshot to the CPU here, written to disk in the background (see ``run``)."""
        extra = {"history": list(self.history), "validation": list(self.validation)}
        state = CheckpointState(
            step=step,
            tensors={name: p.detach() for name, p in self.params.items()},
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),
            extra=extra,
        )
        if self.ema is not None:
            state.tensors.update({f"__ema__.{i}": t for i, t in enumerate(self.ema.shadow_params)})
        if self.acc.is_main_process:
            with phase("checkpoint"):
                written = self.store.save_in_background(state)
            written.add_done_callback(lambda f: f.exception() or log.info("checkpoint saved: %s", f.result()))
        self.acc.wait_for_everyone()

    def _resume(self) -> int:
        if self.acc.is_main_process:
            self.store.discard_stale()
        self.acc.wait_for_everyone()
        latest = self.store.latest()
        if latest is None:
            return 0
        state = CheckpointStore.load(latest)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state.tensors[name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.lr_scheduler)
        if self.ema is not None:
            for i, shadow in enumerate(self.ema.shadow_params):
                shadow.copy_(state.tensors[f"__ema__.{i}"].to(shadow.device))
            self.ema.optimization_step = state.step
        self.history = state.extra["history"]
        self.validation = state.extra["validation"]
        log.info("resuming from %s (step %d of %d)", latest, state.step, self.cfg.max_train_steps)
        return state.step

    # -- the loop -------------------------------------------------------------------------------------------
    def _validate(self, step: int) -> None:
        with phase("validation"):
            record = {"step": step, **self.probes()}
            self.validation.append(record)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
            if self.validate_images is not None:
                self.validate_images(step)

    def run(self) -> TrainResult:
        """Train to ``max_train_steps`` (resuming if a checkpoint of this config exists)."""
        start = self._resume()
        if start == 0:
            self._validate(0)
        self.unet.train()
        total = self.cfg.max_train_steps
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        bar = tqdm(
            range(start, total), initial=start, total=total, desc="train", unit="step",
            disable=not self.acc.is_main_process,
        )  # fmt: skip
        with phase("train"):
            for a, b in segments(start, total, self.cfg.validation_steps, self.cfg.checkpointing_steps):
                self.train_steps(a, b, bar)
                if b % self.cfg.validation_steps == 0 or b == total:
                    self._validate(b)
                if b % self.cfg.checkpointing_steps == 0 or b == total:
                    self._save(b)
        bar.close()
        with phase("save"):
            self.store.wait()  # the last checkpoint is on disk before the stage writes its outputs
        elapsed = time.perf_counter() - t0
        if self.ema is not None:
            self.ema.copy_to(list(self.params.values()))
        return TrainResult(step=total, history=self.history, metrics=self._summary(total - start, elapsed))

    def train_steps(self, start: int, stop: int, bar: tqdm | None = None) -> None:
        """Steps ``start`` .. ``stop - 1`` (0-based), their losses appended to the history and logged; eager, or as
        replays of one CUDA graph captured at the first call (losses read back every few steps and at ``stop``)."""
        if self.graph_blocker is not None:
            for step in range(start, stop):
                self._log_step(step + 1, self.train_step(step), bar)
            return
        if self.graphed is None:
            with phase("capture"):
                captured = self._capture(start)
            if not captured:
                self.train_steps(start, stop, bar)  # eager from here on
                return
        for step in range(start, stop):
            self.graphed.step(step)
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(list(self.params.values()))
            self.graphed.record(step + 1, float(self.lr_scheduler.get_last_lr()[0]))
            if self.graphed.log_full or step + 1 == stop:
                self._drain(bar)

    def _capture(self, start: int) -> bool:
        """Capture the step as a CUDA graph; on failure, say why and stay eager (the weights are untouched)."""
        t0 = time.perf_counter()
        try:
            # the eager reference first: the capture's emptying of the allocator's cache then frees its memory too
            eager = self._eager_loss(start)
            self.graphed = GraphedStep(
                self._draw,
                lambda draws: self._loss_terms(self._assemble(draws), self._graph_autocast()),
                self.optimizer,
                self.cfg.max_grad_norm,
                start,
                self.device,
            )
            mismatch = self._graph_mismatch(start, eager)
        except RuntimeError as err:  # e.g. an operation that cannot be captured in this torch/driver
            mismatch = f"capture failed: {str(err).splitlines()[0]}"
        if mismatch is not None:
            self.graph_blocker, self.graphed = mismatch, None
            log.warning("training step not captured as a CUDA graph (%s); training eagerly", mismatch)
            self.optimizer.zero_grad()
            return False
        log.info("training step captured as a CUDA graph and checked in %.1f s", time.perf_counter() - t0)
        return True

    def _eager_loss(self, step: int) -> float:
        """The eager step's loss on ``step``'s batch with the current weights (no update)."""
        with torch.no_grad():
            return self._loss_terms(self._batch(step), self._graph_autocast())["loss"].item()

    def _graph_mismatch(self, step: int, eager: float, rel: float = 2e-2) -> str | None:
        """Why the captured step cannot be trusted, or None: its loss on ``step``'s batch (update held back) must
        equal ``eager``, the eager loss on the same batch and weights, within bf16 rounding."""
        assert self.graphed is not None
        replayed = self.graphed.replayed_loss(step)
        if math.isfinite(eager) and abs(replayed - eager) > rel * abs(eager):
            return f"the captured step's loss {replayed:.6g} differs from the eager step's {eager:.6g}"
        return None

    def _log_step(self, done: int, record: dict[str, float], bar: tqdm | None) -> None:
        self.history.append({"step": done, **record})
        self.tracker.log_metrics(record, step=done)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            bar.update()

    def _graph_autocast(self) -> AbstractContextManager:
        """Autocast for the captured step: the configured half precision, no cast cache (graphs need none)."""
        dtype = {"bf16": torch.bfloat16}.get(self.cfg.mixed_precision)
        return torch.autocast(
            "cuda", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False
        )

    def _non_finite(self, loss: float, step: int, kept: str) -> NonFiniteLossError:
        """The error for a non-finite loss at ``step`` (1-based); ``kept`` says what happened to the weights."""
        return NonFiniteLossError(
            f"non-finite loss ({loss}) at step {step}; {kept}. Last good checkpoint: "
            f"{self.store.latest() or 'none'}. Lower the learning rate or check the data."
        )

    def _drain(self, bar: tqdm | None) -> None:
        """Read the graphed steps' losses back (one transfer), log them, stop at the first non-finite loss."""
        assert self.graphed is not None
        last = None
        for done, record in self.graphed.drain(with_prior=self.data.prior is not None):
            if not math.isfinite(record["loss"]):
                raise self._non_finite(record["loss"], done, "no update was applied from that step on")
            self._log_step(done, record, bar)
            last = done
        applied = int(self.optimizer.step_count)  # the losses' transfer already waited for the replays
        if last is not None and applied != last:
            raise StageError(
                f"the captured training step applied {applied} optimizer updates in {last} steps; "
                "set compute.cuda_graphs=false to train eagerly and report this"
            )

    def _summary(self, steps_run: int, elapsed: float) -> dict[str, float]:
        tail = self.history[-10:]
        keys = [k for k in (tail[0] if tail else {}) if k not in ("step", "lr")]
        metrics = {
            f"final_{k}": sum(h[k] for h in tail) / len(tail) for k in keys
        }  # mean of the last 10 steps
        first, last = self.validation[0], self.validation[-1]
        best = min((v for v in self.validation if v["step"] > 0), key=lambda v: v["val_loss"], default=last)
        metrics.update(
            steps=float(len(self.history)),
            steps_run=float(steps_run),
            steps_per_s=steps_run / elapsed if elapsed > 0 else 0.0,
            val_loss_start=first["val_loss"],
            val_loss=last["val_loss"],
            best_val_loss=best["val_loss"],
            best_val_step=float(best["step"]),
            class_probe_loss_start=first["class_probe_loss"],
            class_probe_loss=last["class_probe_loss"],
            peak_memory_mb=peak_memory_mb(self.device),
        )
        return metrics


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA allocation, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
