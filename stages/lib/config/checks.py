"""Allowed values and ranges of the configuration, checked when params.yaml is loaded (before any model loads).

Each problem is a :class:`ConfigError` naming the full key, the value and what is allowed. The sets of names are
written here, without importing torch or diffusers (DVC's Hydra composition imports the schema in its own process);
tests check them against the libraries' own lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stages.lib.errors import ConfigError

if TYPE_CHECKING:
    from stages.lib.config.schema import PipelineConfig, PrepConfig, TrainConfig

OPTIMIZERS = ("adamw8bit", "adamw", "prodigy")
MIXED_PRECISION = ("no", "fp16", "bf16")
# diffusers.optimization.SchedulerType's values
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "piecewise_constant",
)
ANNOTATORS = ("canny",)
DEVICES = ("auto", "cpu", "cuda")
BAD_INPUT_POLICIES = ("skip", "fail")
IMAGE_FORMATS = ("png", "jpg", "webp")  # prep's SAVE_OPTIONS
EXPORT_DTYPES = ("float16", "bfloat16", "float32")
SD15_NARROWEST_ATTENTION = 320  # SD1.5's first UNet block: the widest LoRA rank its to_q/k/v/out fit


def one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; use one of: {', '.join(allowed)}")


def at_least(key: str, value: float, low: float, why: str = "") -> None:
    """``value >= low``."""
    if not value >= low:  # also refuses NaN
        raise ConfigError(f"{key}={value!r} must be >= {low:g}{f' ({why})' if why else ''}")


def between(key: str, value: float, low: float, high: float, closed_high: bool = True) -> None:
    """``low <= value <= high`` (or ``< high``)."""
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"{key}={value!r} must be in [{low:g}, {high:g}{bracket}")


def multiple_of_8(key: str, value: int) -> None:
    """Image sizes: the VAE works on 8-pixel cells."""
    if value <= 0 or value % 8:
        raise ConfigError(f"{key}={value!r} must be a positive multiple of 8 (the VAE's cell size)")


def check_train(key: str, train: TrainConfig) -> None:
    """One training section (``dreambooth``, ``lora.train``, ``controlnet.train``, ``model.tiny.pretrain``)."""
    one_of(f"{key}.optimizer", train.optimizer, OPTIMIZERS)
    one_of(f"{key}.mixed_precision", train.mixed_precision, MIXED_PRECISION)
    one_of(f"{key}.lr_scheduler", train.lr_scheduler, LR_SCHEDULERS)
    multiple_of_8(f"{key}.resolution", train.resolution)
    at_least(f"{key}.train_batch_size", train.train_batch_size, 1)
    if not train.learning_rate > 0:
        raise ConfigError(f"{key}.learning_rate={train.learning_rate!r} must be > 0")
    at_least(f"{key}.lr_warmup_steps", train.lr_warmup_steps, 0)
    at_least(f"{key}.max_train_steps", train.max_train_steps, 0)
    between(f"{key}.adam_beta1", train.adam_beta1, 0, 1, closed_high=False)
    between(f"{key}.adam_beta2", train.adam_beta2, 0, 1, closed_high=False)
    at_least(f"{key}.adam_weight_decay", train.adam_weight_decay, 0)
    at_least(f"{key}.adam_epsilon", train.adam_epsilon, 0)
    at_least(f"{key}.max_grad_norm", train.max_grad_norm, 0, "0 disables clipping")
    at_least(f"{key}.prior_loss_weight", train.prior_loss_weight, 0)
    at_least(f"{key}.snr_gamma", train.snr_gamma, 0, "0 disables min-SNR weighting")
    at_least(f"{key}.face_loss_weight", train.face_loss_weight, 1, "1 disables the face weighting")
    between(f"{key}.ema_decay", train.ema_decay, 0, 1, closed_high=False)
    at_least(f"{key}.checkpointing_steps", train.checkpointing_steps, 1)
    at_least(f"{key}.checkpoints_total_limit", train.checkpoints_total_limit, 1)
    at_least(f"{key}.validation_steps", train.validation_steps, 1)
    at_least(f"{key}.num_validation_images", train.num_validation_images, 0)
    at_least(f"{key}.validation_inference_steps", train.validation_inference_steps, 1)
    at_least(f"{key}.validation_guidance_scale", train.validation_guidance_scale, 0)
    at_least(f"{key}.validation_holdout", train.validation_holdout, 0)
    at_least(f"{key}.num_probes", train.num_probes, 1)


def check_sampling(key: str, steps: int, guidance: float) -> None:
    """Sampling settings: at least one step; guidance >= 0 (below 1 turns classifier-free guidance off)."""
    at_least(f"{key}.num_inference_steps", steps, 1)
    at_least(f"{key}.guidance_scale", guidance, 0, "values below 1 turn classifier-free guidance off")


def narrowest_lora_layer(cfg: PipelineConfig) -> int:
    """The output width of the narrowest layer LoRA adapts: the tiny UNet's first block, or SD1.5's 320."""
    if cfg.model.source == "tiny":
        return min(cfg.model.tiny.unet_channels)
    return SD15_NARROWEST_ATTENTION


def check_lora(cfg: PipelineConfig) -> None:
    """``lora.ranks`` positive, distinct and no wider than the layers; the featured ``lora.rank`` one of them."""
    ranks = list(cfg.lora.ranks)
    if not ranks:
        raise ConfigError("lora.ranks=[] is empty; list at least one rank, e.g. lora.ranks=[4,8,24]")
    if len(set(ranks)) != len(ranks):
        raise ConfigError(f"lora.ranks={ranks} repeats a rank; list each once")
    widest = narrowest_lora_layer(cfg)
    for rank in ranks:
        if not 1 <= rank <= widest:
            raise ConfigError(
                f"lora.ranks contains {rank}: a rank must be in [1, {widest}] "
                f"(the narrowest adapted layer of model.source={cfg.model.source} has {widest} features)"
            )
    if cfg.lora.rank not in ranks:
        raise ConfigError(untrained_rank_message(cfg.lora.rank, ranks))
    at_least("lora.alpha", cfg.lora.alpha, 0, "0 means alpha = rank")


def untrained_rank_message(rank: int, ranks: list[int]) -> str:
    """The featured ``lora.rank`` is not among the trained ``lora.ranks``: what to run instead."""
    wanted = ",".join(map(str, sorted({*ranks, rank})))
    return (
        f"lora.rank={rank} is not trained (lora.ranks={ranks}). "
        f"Add it: dvc exp run -S 'lora.ranks=[{wanted}]' -S lora.rank={rank}"
    )


def check_prep(prep: PrepConfig) -> None:
    """prep's settings (also checked by the stage itself, for configurations built in code)."""
    multiple_of_8("prep.resolution", prep.resolution)
    one_of("prep.on_bad_input", prep.on_bad_input, BAD_INPUT_POLICIES)
    at_least("prep.face_padding", prep.face_padding, 1, "1 crops tight on the face")
    between("prep.min_face_fraction", prep.min_face_fraction, 0, 1, closed_high=False)
    one_of("prep.image_format", prep.image_format, IMAGE_FORMATS)
    at_least("prep.contact_sheet_columns", prep.contact_sheet_columns, 1)


def _ordered(low_key: str, low: float, high_key: str, high: float) -> None:
    if not low < high:
        raise ConfigError(f"{low_key}={low!r} must be below {high_key}={high!r}")


def _check_all(cfg: PipelineConfig) -> None:
    one_of("compute.device", cfg.compute.device.split(":")[0], DEVICES)
    at_least("compute.num_processes", cfg.compute.num_processes, 1)
    check_prep(cfg.prep)
    at_least("class_images.num_class_images", cfg.class_images.num_class_images, 0)
    check_sampling("class_images", cfg.class_images.num_inference_steps, cfg.class_images.guidance_scale)
    check_train("dreambooth", cfg.dreambooth)
    check_train("lora.train", cfg.lora.train)
    check_train("controlnet.train", cfg.controlnet.train)
    check_train("model.tiny.pretrain", cfg.model.tiny.pretrain)
    check_lora(cfg)
    one_of("convert.single_file_dtype", cfg.convert.single_file_dtype, EXPORT_DTYPES)
    check_sampling("infer", cfg.infer.num_inference_steps, cfg.infer.guidance_scale)
    multiple_of_8("infer.height", cfg.infer.height)
    multiple_of_8("infer.width", cfg.infer.width)
    at_least("infer.num_images_per_prompt", cfg.infer.num_images_per_prompt, 1)
    c = cfg.controlnet
    one_of("controlnet.annotator", c.annotator, ANNOTATORS)
    at_least("controlnet.conditioning_scale", c.conditioning_scale, 0)
    between("controlnet.guidance_start", c.guidance_start, 0, 1)
    between("controlnet.guidance_end", c.guidance_end, 0, 1)
    _ordered("controlnet.guidance_start", c.guidance_start, "controlnet.guidance_end", c.guidance_end)
    _ordered("controlnet.low_threshold", c.low_threshold, "controlnet.high_threshold", c.high_threshold)
    check_map_transform(cfg)


def _scale(key: str, value: float) -> None:
    """A zoom factor: in (0, 1] (zooming in would crop the map or photo)."""
    if not 0 < value <= 1:
        raise ConfigError(f"{key}={value!r} must be in (0, 1]: 1 keeps the size, below 1 zooms out")


def check_map_transform(cfg: PipelineConfig) -> None:
    """``controlnet.map_transform`` and ``controlnet.augment``: zoom out only, shifts keeping the centre inside."""
    t, a = cfg.controlnet.map_transform, cfg.controlnet.augment
    _scale("controlnet.map_transform.scale", t.scale)
    between("controlnet.map_transform.shift_x", t.shift_x, -0.5, 0.5)
    between("controlnet.map_transform.shift_y", t.shift_y, -0.5, 0.5)
    at_least("controlnet.augment.copies", a.copies, 0, "0 trains on the pairs as they are")
    _scale("controlnet.augment.min_scale", a.min_scale)
    between("controlnet.augment.max_shift", a.max_shift, 0, 0.5)


def check_config(cfg: PipelineConfig, source: str = "params.yaml") -> None:
    """Every allowed-value and range check of the pipeline's configuration; the first failure is raised with the
    params file named."""
    try:
        _check_all(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
