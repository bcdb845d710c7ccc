"""Typed configuration: one dataclass per Hydra config group.

The dataclass defaults are the seed recipe (the ``seed_hw4`` profile); the tiny embedded default lives in
``conf/profile/tiny.yaml``. The same classes are registered with Hydra's ConfigStore (see
``hydra_plugins/sdpipe``), so ``dvc exp run -S key=value`` rejects unknown keys and wrong types before any stage
runs, and the stages read their section of ``params.yaml`` back into these classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Optional

from stages.lib.config.batch_size import parse_batch_size


@dataclass
class TrainConfig:
    """Settings shared by DreamBooth, LoRA, ControlNet training and the tiny pretraining (one loop serves all)."""

    resolution: int = 512
    train_batch_size: int = 1
    learning_rate: float = 2e-6
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 800
    optimizer: str = "adamw8bit"  # adamw8bit | adamw | prodigy
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    mixed_precision: str = "bf16"  # no | fp16 | bf16 (CUDA only; CPU always trains in fp32)
    gradient_checkpointing: bool = False
    snr_gamma: float = 0.0  # 0 disables min-SNR weighting
    noise_offset: float = 0.0
    face_loss_weight: float = 1.0  # >1 weights the face box from prep's manifest; 1 disables masking
    use_ema: bool = False
    ema_decay: float = 0.999
    checkpointing_steps: int = 200
    checkpoints_total_limit: int = 2
    validation_steps: int = 200
    num_validation_images: int = 2
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    validation_holdout: int = (
        0  # instance images kept out of training for the validation loss (0: fixed probes)
    )
    num_probes: int = 4  # images used by the fixed-noise probe losses
    seed: int = 0


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}

# TrainConfig's fields, each optional: what lora.train and controlnet.train state; None (null in params.yaml)
# takes dreambooth's value, so a training option is one TrainConfig field that every trainer inherits.
TrainOverrides = make_dataclass(
    "TrainOverrides",
    [(f.name, Optional[_SCALARS[f.type]], field(default=None)) for f in fields(TrainConfig)],  # noqa: UP045
)
TrainOverrides.__module__ = __name__  # resolvable by name, like the classes written out here


def inherit(base: TrainConfig, overrides: object) -> TrainConfig:
    """``base``'s training settings with every value ``overrides`` (a ``TrainOverrides``) sets; a ``TrainConfig``
    is returned as it is (already resolved)."""
    if isinstance(overrides, TrainConfig):
        return overrides
    values = {f.name: getattr(base, f.name) for f in fields(TrainConfig)}
    values.update({k: v for k, v in asdict(overrides).items() if v is not None})  # type: ignore[call-overload]
    return TrainConfig(**values)


@dataclass
class WorldConfig:
    """The miniature world of faces the tiny default is pretrained on (stages/lib/miniature/world.py)."""

    num_images: int = 2000
    caption_dropout: float = 0.1  # share of empty captions (classifier-free guidance)
    seed: int = 0
    reader_steps: int = 600  # attribute reader training steps (0: no reader)
    reader_noise: float = 0.5  # latent noise (x latent std) on the reader's training images


@dataclass
class TinyModelConfig:
    """Sizes of the embedded SD-architecture pipeline, and its pretraining on the miniature world."""

    seed: int = 0
    sample_size: int = 64  # pixels; latents are sample_size / 4
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    unet_layers_per_block: int = 1
    unet_norm_groups: int = 16
    attention_head_dim: int = 8
    vae_channels: list[int] = field(default_factory=lambda: [16, 16, 16])
    vae_norm_groups: int = 4
    latent_channels: int = 4
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 64
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            resolution=64,
            train_batch_size=32,
            learning_rate=4e-3,
            lr_scheduler="cosine",
            lr_warmup_steps=50,
            max_train_steps=1000,  # 0: keep the random initialisation
            optimizer="adamw",
            with_prior_preservation=False,
            train_text_encoder=True,  # the caption words learn what they show (a random encoder blurs them)
            snr_gamma=5.0,
            checkpointing_steps=250,
            validation_steps=250,
            num_validation_images=8,
            validation_inference_steps=20,
            validation_guidance_scale=3.0,
        )
    )


@dataclass
class ModelConfig:
    """Where the base model comes from.

    source: ``tiny`` (embedded default, built offline), ``hub`` (a hub id already in the local cache, pinned by
    ``revision``), ``folder`` (a local diffusers folder) or ``single_file`` (a civitai-style .safetensors/.ckpt).
    """

    source: str = "tiny"
    path: str = ""
    revision: str = ""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    """The user's subject: photo folder and prompts."""

    instance_dir: str = "data/sample_subject"
    instance_prompt: str = "a photo of sks man face"
    class_prompt: str = "a photo of man face"
    instance_token: str = "sks"


@dataclass
class SampleSubjectConfig:
    """The embedded sample subject generated when no user photos are given."""

    num_images: int = 24
    min_size: int = 160
    max_size: int = 320
    seed: int = 7
    # <photo>.txt beside each photo taken in a scene: data.instance_prompt naming it ("... in a kitchen", kohya's
    # convention, read by prep); photos on a plain background keep the instance prompt
    captions: bool = True


@dataclass
class PrepConfig:
    """Birme-style square crops centred on the face."""

    resolution: int = 512
    on_bad_input: str = "skip"  # skip | fail
    face_padding: float = 1.8  # crop side = face size * face_padding (clamped to the image)
    min_face_fraction: float = 0.05  # ignore detections smaller than this fraction of the short side
    allow_upscale: bool = False  # False: reject images with short side < resolution, never upscale a crop
    require_face: bool = False  # True: reject photos where no face is found (False: saliency / centre crop)
    contact_sheet_columns: int = 8
    image_format: str = "png"


@dataclass
class ClassImagesConfig:
    """Prior-preservation images of the class prompt, generated with the base model."""

    num_class_images: int = 500
    # images per pipeline call: auto (CUDA: the largest that fits, up to 32; CPU: see stages/lib/sampling/sampler.py) or
    # a positive integer; the images do not depend on it
    sample_batch_size: str = "auto"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self) -> None:
        parse_batch_size(self.sample_batch_size, "class_images.sample_batch_size")


@dataclass
class DreamBoothConfig(TrainConfig):
    """Full-UNet DreamBooth with prior preservation."""


@dataclass
class LoraConfig:
    """LoRA adapters on the DreamBooth UNet, one DVC stage per rank in ``ranks``.

    ``train`` states what differs from ``dreambooth`` (the LoRA learning rate); the rest is inherited when the
    configuration is built. It is a separate node so that changing the featured ``rank`` or adding a rank to
    ``ranks`` never retrains the other adapters.
    """

    ranks: list[int] = field(default_factory=lambda: [4, 8, 24])
    rank: int = 24  # the featured adapter used by infer / compare / controlnet
    alpha: float = 0.0  # 0 means alpha = rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train: TrainOverrides = field(  # type: ignore[valid-type]
        default_factory=lambda: TrainOverrides(learning_rate=5e-4, train_text_encoder=False)
    )


@dataclass
class ConvertConfig:
    """Exports of the trained weights for tools outside diffusers."""

    bin: bool = True  # the seed's conversion: each LoRA .safetensors -> pytorch_lora_weights.bin
    kohya: bool = True  # each LoRA in the kohya / AUTOMATIC1111 / ComfyUI key format
    single_file: bool = True  # the DreamBooth model as one original-layout (civitai-style) .safetensors
    single_file_dtype: str = "float16"  # float16 | bfloat16 | float32
    extract_rank: int = 32  # LoRA extracted from the DreamBooth UNet delta (0 disables)
    merged: bool = True  # DreamBooth + the featured LoRA fused into one single-file checkpoint


@dataclass
class InferConfig:
    """Inference images for the prompt list."""

    prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of sks man face in a kitchen",
            "anime style portrait of sks man face",
            "classicist art painting of sks man face",
            "a photo of sks man face in a forest",
            "a photo of sks man face in a night city",
        ]
    )
    negative_prompt: str = ""
    num_images_per_prompt: int = 2
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = ""  # empty keeps the pipeline's scheduler
    seed: int = 0
    variants: list[str] = field(default_factory=lambda: ["base", "dreambooth", "lora", "lora_extracted"])
    all_ranks: bool = (
        True  # the "lora" variant: every rank in lora.ranks (False: only the featured lora.rank)
    )
    # images per pipeline call, prompts mixed: auto (as class_images.sample_batch_size) or a positive integer
    batch_size: str = "auto"
    class_prompt_images: int = 4  # per variant, of data.class_prompt: language drift and class diversity

    def __post_init__(self) -> None:
        parse_batch_size(self.batch_size, "infer.batch_size")


@dataclass
class CompareConfig:
    """DreamBooth UNet vs LoRA table and rank study."""

    rank_study_prompt: str = "forest"  # a substring of one infer prompt
    clip_model_path: str = ""
    dino_model_path: str = ""


@dataclass
class MapTransformConfig:
    """A geometric transform of the control maps before generation (stages/lib/imaging/map_transform.py): a
    layout that differs from the photos' (the defaults leave the maps as drawn)."""

    mirror: bool = False  # left-right about the centre
    scale: float = 1.0  # in (0, 1]: below 1 zooms out about the centre
    shift_x: float = 0.0  # a fraction of the width, positive: right
    shift_y: float = 0.0  # a fraction of the height, positive: down


@dataclass
class PairAugmentConfig:
    """Training pairs with moved layouts: ``copies`` randomly transformed copies of each (map, photo) pair, the
    map and the photo moved alike, beside the pair itself (a trained ControlNet only)."""

    copies: int = 0  # 0: the pairs as they are
    mirror: bool = True  # each copy mirrored with probability 1/2
    min_scale: float = 1.0  # in (0, 1]: each copy's scale drawn in [min_scale, 1]
    max_shift: float = 0.0  # in [0, 0.5]: each copy's shifts drawn in [-max_shift, max_shift]


@dataclass
class ControlNetConfig:
    """Canny-guided generation of the personalised subject: a pretrained ControlNet, or one trained here."""

    annotator: str = "canny"
    low_threshold: int = 100
    high_threshold: int = 200
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    model_path: str = (
        ""  # pretrained SD1.5 ControlNet: diffusers folder, single file or hub id; empty: train one
    )
    revision: str = ""  # the pinned revision of a hub id in model_path (read from the local cache only)
    prompt: str = "a photo of sks man face"
    control_images: list[str] = field(default_factory=list)  # empty: the first prepared photos
    num_control_images: int = 4  # how many prepared photos, when control_images is empty
    edge_tolerance: float = 0.0075  # edge F1 match distance, a fraction of the image diagonal (BSDS)
    map_transform: MapTransformConfig = field(default_factory=MapTransformConfig)
    augment: PairAugmentConfig = field(default_factory=PairAugmentConfig)
    # Training when model_path is empty: what differs from ``dreambooth`` (the rest is inherited): the ControlNet
    # learning rate (diffusers' train_controlnet.py examples use 1e-5); only the ControlNet trains.
    train: TrainOverrides = field(  # type: ignore[valid-type]
        default_factory=lambda: TrainOverrides(learning_rate=1e-5, train_text_encoder=False)
    )


@dataclass
class TrackingConfig:
    """MLflow tracking; an empty uri means a SQLite store at the DVC root."""

    enabled: bool = True
    uri: str = ""
    experiment_name: str = "sd-personalise"
    background: bool = True  # log from a child process: the stage does not wait for MLflow's import


@dataclass
class ComputeConfig:
    """Where the stages run."""

    device: str = "auto"  # auto | cpu | cuda
    num_processes: int = 1
    num_threads: int = 0  # 0 leaves torch's default
    # Speed levers, used on CUDA only; none changes what is computed beyond float rounding (benchmarks/speed.py
    # checks each against the plain path). Switch one off to compare or to work around a driver problem.
    cuda_graphs: bool = True  # the training step and validation's UNet forward replayed as CUDA graphs
    flat_optimizer: bool = True  # adamw8bit as one kernel over a flat parameter buffer (8-bit states)
    channels_last: bool = True  # UNet and VAE convolutions in NHWC memory layout
    half_frozen_weights: bool = (
        True  # frozen Linear/Conv weights (LoRA, ControlNet) kept in bf16: no per-step casts
    )
    fuse_qkv: bool = True  # attention q/k/v projections as one matmul when sampling
    compile_unet: bool = False  # torch.compile the sampler's UNet (first compile minutes; cached on disk)
    # cuDNN's fused attention compiles a kernel per input shape on first use: ~10 s per SD1.5 training process,
    # where the other kernels run as fast; sampling stages keep it (9 % faster at batch 32, few shapes)
    cudnn_attention_in_training: bool = False


@dataclass
class PipelineConfig:
    """The whole composed configuration (params.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample_subject: SampleSubjectConfig = field(default_factory=SampleSubjectConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    class_images: ClassImagesConfig = field(default_factory=ClassImagesConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    # Written when conf/ is composed (conf/config.yaml interpolates hydra_plugins/sdpipe's resolver): the keys and
    # values of the composition passed stages/lib/config/checks.py, so a bad `-S` stops before params.yaml changes.
    checked: str = ""

    def __post_init__(self) -> None:
        """``lora.train`` and ``controlnet.train`` become whole ``TrainConfig``s: dreambooth's settings with theirs."""
        self.lora.train = inherit(self.dreambooth, self.lora.train)
        self.controlnet.train = inherit(self.dreambooth, self.controlnet.train)


SECTIONS: dict[str, type] = {
    name: f.default_factory  # type: ignore[misc]
    for name, f in PipelineConfig.__dataclass_fields__.items()
    if callable(f.default_factory)
}
