"""The whole seed recipe (``profile=seed_hw4``) end to end through dvc.yaml's own stage commands, timed per stage.

Every stage runs as the process ``dvc repro`` would start: the ``cmd`` of each dvc.yaml stage, its ``${...}``
resolved from the params, run in a fresh workspace folder (``--work``) that holds ``params.yaml`` and where
dvc.yaml's relative paths (data/, models/, reports/, checkpoints/) land. So each stage's time includes what a user
waits for: the interpreter, imports, model loading, latent encoding, validation, saving. DVC itself is left out
(no hashing of deps and outs, no cache, no run-cache reuse: every stage runs), and so is MLflow
(``tracking.enabled=false``). Stages, in dvc.yaml's order: sample_subject, base, prep, class_images, dreambooth,
lora@<rank> per ``lora.ranks``, convert, infer, compare (``--leave-out convert compare`` drops the optional two;
infer then skips its ``lora_extracted`` variant). controlnet_train and controlnet are not part of the recipe.

The base model is a full-size SD1.5 with random weights (diffusers' / transformers' own initialisation, seeded),
written by this script as one fp16 original-layout ``.safetensors`` (like a civitai download) before the timed
stages; the ``base`` stage converts it, as on a user's first run. ``--tiny`` instead writes the embedded default's
architecture with random weights as a diffusers folder and runs at 64 px with 2 sampling steps: a smoke run.
``--scale F`` multiplies the class-image count and the training steps (with the validation and checkpoint
intervals, so each run keeps its share of them); sampling steps per image stay. The JSON records the scale.

Without an OpenCV that has Haar cascades (opencv 5), prep and compare would stop on stages.lib.imaging.faces's error;
there they run through this module (``--stage-without-haar``) with face detection finding no face, so prep crops
at the saliency centroid (or the centre) and compare's face_detection_rate is 0; the JSON says so.
compare's image metrics need ``cv2.HOGDescriptor``, which OpenCV 5 lacks: there compare is left out, and the JSON's
``left_out`` says why.

The params come from conf/: where DVC is installed, ``profile=seed_hw4 tracking.enabled=false`` is
composed into ``--params`` (default tmp/recipe/seed_hw4.yaml, git-ignored); a GPU host without DVC reads that
file, copied there.

CPU smoke run (5 min on 2 CPU cores; the tiny model at 64 px, every stage)::

    python -m benchmarks.recipe --tiny --scale 0.01 --device cpu --work /tmp/recipe-smoke

A GPU host without DVC or diffusers (compose where DVC is installed, then copy tmp/recipe/seed_hw4.yaml and
wheels in .whl/)::

    python -m benchmarks.recipe --compose-only
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site && python3 -m benchmarks.recipe --out $OUT/recipe_h200.json

``--scale 0.1`` there gives the quick check (50 class images, 80 training steps per model).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.report_files import source_commit
from stages.lib.runtime.timings import PROFILE_ENV, TIMINGS_ENV, summary_line

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = ROOT / "tmp" / "recipe" / "seed_hw4.yaml"
PROFILE = ["profile=seed_hw4", "tracking.enabled=false"]
RECIPE_STAGES = (
    "sample_subject",
    "base",
    "prep",
    "class_images",
    "dreambooth",
    "lora",
    "convert",
    "infer",
    "compare",
)
OPTIONAL_STAGES = ("convert", "compare")
FACE_STAGES = ("prep", "compare")  # the stages that call stages.lib.imaging.faces
WITHOUT_HAAR = "--stage-without-haar"
TRAIN_SECTIONS = ("dreambooth", "lora.train")
SCALED_TRAIN_KEYS = ("max_train_steps", "validation_steps", "checkpointing_steps")
SD15_FILE = "models/external/sd15-random-fp16.safetensors"
TINY_FOLDER = "models/external/tiny-random"
VERSIONED = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "bitsandbytes")
VERSIONED += ("opencv-python-headless", "opencv-python", "omegaconf")
WORKSPACE_MARK = ".recipe-workspace"
INTERPOLATION = re.compile(r"\$\{([^}]+)\}")
NOTES = [
    "seconds: wall time of the stage's process, as dvc repro starts it (interpreter, imports, loading, work, saving)",
    "stage_timer_seconds: the part the stage times itself (generation, or the training loop with its validations "
    "and checkpoints); outside_timer_seconds: the rest",
    "phases: the stage process's wall time by phase (stages/lib/runtime/timings.py): startup = interpreter, "
    "imports and config; fingerprint, load, encode, capture, train, validation, checkpoint, sampling, save; other = the rest",
    "scale multiplies class_images.num_class_images and the training steps with their validation / checkpoint "
    "intervals; sampling steps per image and infer's images are not scaled",
    "infer samples every variant of infer.variants (base, dreambooth, each LoRA rank, lora_extracted when convert "
    "ran) with the prompts and infer.class_prompt_images each",
    "random weights: the images are noise; throughput, not quality, is measured",
]


@dataclass
class StageCommand:
    """One dvc.yaml stage (a ``foreach`` item is its own, e.g. ``lora@4``) with everything resolved."""

    key: str
    stage: str
    argv: list[str]
    outs: list[str]
    metrics: list[str]


@dataclass
class StageResult:
    """What one stage's process did: wall time, exit status, its metrics.json and the outputs dvc.yaml lists."""

    key: str
    command: str
    seconds: float
    returncode: int
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs_mb: dict[str, float] = field(default_factory=dict)
    missing_outputs: list[str] = field(default_factory=list)
    stage_timer_seconds: float | None = None  # the stage's own timed part, where its metrics.json reports one
    outside_timer_seconds: float | None = None  # the rest: interpreter, imports, loading, encoding, saving
    phases: dict[str, float] = field(default_factory=dict)  # the stage's own breakdown (runtime/timings.py)


# ------------------------------------------------------------------------------------------------ params


def dvc_available() -> bool:
    """Whether conf/ can be composed here (DVC with its Hydra integration is installed)."""
    return importlib.util.find_spec("dvc") is not None and importlib.util.find_spec("hydra") is not None


def compose_params(path: Path) -> Path:
    """Compose conf/ with the seed profile and tracking off into ``path`` (what `dvc exp run` would write)."""
    from stages.compose import compose

    path.parent.mkdir(parents=True, exist_ok=True)
    return compose(path, PROFILE, root=ROOT)


def read_params(path: Path) -> dict[str, Any]:
    """The composed params, or SystemExit saying how to make them."""
    if not path.is_file():
        raise SystemExit(
            f"{path}: not found. Compose it where DVC is installed (`python -m benchmarks.recipe --compose-only "
            f"--params {path}`) and carry it to this machine."
        )
    return yaml.safe_load(path.read_text())


def set_key(params: dict[str, Any], dotted: str, value: Any, changes: dict[str, Any]) -> None:
    """Set ``a.b.c`` in the nested params, which must exist already; record the change."""
    *parents, leaf = dotted.split(".")
    node: Any = params
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        raise SystemExit(f"unknown params key '{dotted}'")
    node[leaf] = value
    changes[dotted] = value


def get_key(params: dict[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` of the nested params."""
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def scaled(value: int, factor: float) -> int:
    """``value * factor`` rounded, at least 1."""
    return max(1, round(value * factor))


def scale_overrides(params: dict[str, Any], factor: float) -> dict[str, Any]:
    """Class-image count and training steps (with validation / checkpoint intervals) times ``factor``; a training
    key left null in ``lora.train`` / ``controlnet.train`` follows dreambooth's scaled value."""
    keys = ["class_images.num_class_images"]
    keys += [f"{section}.{key}" for section in TRAIN_SECTIONS for key in SCALED_TRAIN_KEYS]
    values = {key: get_key(params, key) for key in keys}
    return {k: scaled(v, factor) for k, v in values.items() if v is not None} if factor != 1.0 else {}


def tiny_overrides() -> dict[str, Any]:
    """The smoke run: the random tiny model at 64 px, 2 sampling steps, a few small sample photos."""
    overrides: dict[str, Any] = {
        "model.source": "folder",
        "model.path": TINY_FOLDER,
        "sample_subject.num_images": 8,
        "sample_subject.min_size": 96,
        "sample_subject.max_size": 128,
        "prep.resolution": 64,
        "class_images.num_inference_steps": 2,
        "infer.num_inference_steps": 2,
        "infer.height": 64,
        "infer.width": 64,
        "convert.extract_rank": 4,
    }
    for section in TRAIN_SECTIONS:
        overrides |= {f"{section}.resolution": 64, f"{section}.validation_inference_steps": 2}
    return overrides


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs, values read as YAML (``[4]``, ``false``, ``2e-6``)."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: expected key=value")
        pairs[key] = yaml.safe_load(value)
    return pairs


def benchmark_params(base: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The params the stages read, and every value changed from the composed profile."""
    params, changes = copy.deepcopy(base), {}
    overrides = tiny_overrides() if args.tiny else {"model.source": "single_file", "model.path": SD15_FILE}
    overrides |= {"tracking.enabled": False, "compute.device": args.device}
    overrides |= scale_overrides(params, args.scale) | parse_sets(args.set)
    for key, value in overrides.items():
        set_key(params, key, value, changes)
    return params, changes


# ------------------------------------------------------------------------------------------- base model


def sd15_random_components() -> dict[str, Any]:
    """SD1.5's UNet, VAE and CLIP text encoder from the shipped configs, with their own (seeded) initialisation."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stages.lib.models.loading import SD15_CONFIG_DIR

    torch.manual_seed(0)
    return {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder")),
    }


def write_sd15_single_file(path: Path) -> Path:
    """A full-size random SD1.5 as one fp16 original-layout .safetensors (what a civitai download is)."""
    import torch

    from stages.lib.models.single_file import save_single_file

    meta = {"benchmark": "random weights, not a trained model"}
    return save_single_file(sd15_random_components(), path, metadata=meta, dtype=torch.float16)


def write_tiny_folder(path: Path) -> Path:
    """The embedded default's architecture with random weights, as a diffusers pipeline folder."""
    from stages.lib.config.schema import TinyModelConfig
    from stages.lib.miniature.tiny_model import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_pipeline(TinyModelConfig(), Path(tmp) / "tokenizer").save_pretrained(path)
    return path


def write_base_source(params: dict[str, Any], work: Path) -> dict[str, float]:
    """Write the model that ``model.path`` names (not timed as a stage: a user downloads it)."""
    start = time.perf_counter()
    target = work / params["model"]["path"]
    if params["model"]["source"] == "single_file":
        write_sd15_single_file(target)
        size = target.stat().st_size
    else:
        write_tiny_folder(target)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return {"seconds": time.perf_counter() - start, "mb": size / 2**20}


# ------------------------------------------------------------------------------------------- dvc.yaml


def resolve(text: str, params: dict[str, Any], item: Any = None) -> str:
    """dvc.yaml's ``${key.path}`` and ``${item}`` interpolation."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        return str(item) if name == "item" else str(get_key(params, name))

    return INTERPOLATION.sub(value, text)


def entry_paths(entries: list[Any] | None) -> list[str]:
    """Paths of an ``outs`` / ``metrics`` list (plain strings or ``{path: options}``)."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def stage_commands(params: dict[str, Any], stages: tuple[str, ...], dvc_file: Path) -> list[StageCommand]:
    """The wanted stages of dvc.yaml in its order, ``foreach`` expanded, every ``${...}`` resolved."""
    commands = []
    for name, spec in yaml.safe_load(dvc_file.read_text())["stages"].items():
        if name not in stages:
            continue
        if "foreach" in spec:
            items = get_key(params, INTERPOLATION.fullmatch(spec["foreach"]).group(1))
            expanded = [(f"{name}@{item}", spec["do"], item) for item in items]
        else:
            expanded = [(name, spec, None)]
        for key, body, item in expanded:
            argv = shlex.split(resolve(body["cmd"], params, item))
            outs = [resolve(p, params, item) for p in entry_paths(body.get("outs"))]
            metrics = [resolve(p, params, item) for p in entry_paths(body.get("metrics"))]
            commands.append(StageCommand(key, name, argv, outs, metrics))
    return commands


def launcher(command: StageCommand, haar: bool) -> list[str]:
    """The argv to run: dvc.yaml's, with this interpreter; through :func:`stage_without_haar` where needed."""
    argv = [sys.executable, *command.argv[1:]] if command.argv[0] in ("python", "python3") else command.argv
    if not haar and command.stage in FACE_STAGES and argv[1:3] == ["-m", "stages"]:
        argv = [sys.executable, "-m", "benchmarks.recipe", WITHOUT_HAAR, *argv[3:]]
    return argv


# ----------------------------------------------------------------------------------------------- running


def stage_env(work: Path) -> dict[str, str]:
    """The stages import this checkout; offline; tracking off anyway."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_ROOT": str(work)}
    return env


def run_process(
    argv: list[str],
    work: Path,
    log: Path,
    echo: bool,
    timings: Path | None = None,
    profile: Path | None = None,
) -> tuple[int, float]:
    """Run ``argv`` in ``work``, its output into ``log`` (and the console with ``echo``); status and seconds.
    ``timings``: where the stage writes its phase breakdown; ``profile``: where it writes its cProfile stats."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = stage_env(work) | ({TIMINGS_ENV: str(timings)} if timings is not None else {})
    env |= {PROFILE_ENV: str(profile)} if profile is not None else {}
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            if echo:
                sys.stdout.write(line)
        status = proc.wait()
    return status, time.perf_counter() - start


def read_metrics(work: Path, files: list[str]) -> dict[str, Any]:
    """The stage's metrics.json contents (merged when it has several)."""
    metrics: dict[str, Any] = {}
    for name in files:
        if (work / name).is_file():
            metrics |= json.loads((work / name).read_text())
    return metrics


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def stage_timer(stage: str, metrics: dict[str, Any]) -> float | None:
    """Seconds the stage timed itself: generation (base, class_images, infer) or the training loop."""
    if stage in ("base", "class_images", "infer") and "seconds" in metrics:
        return float(metrics["seconds"])
    if metrics.get("steps_per_s"):
        return float(metrics["steps_run"]) / float(metrics["steps_per_s"])
    return None


def run_stage(
    command: StageCommand, work: Path, haar: bool, echo: bool, profile_dir: Path | None = None
) -> StageResult:
    """Run one stage, then read its metrics and check the outputs dvc.yaml lists; with ``profile_dir``, the
    stage's host profile lands there as ``<stage>.prof``."""
    argv = launcher(command, haar)
    timings = work / "logs" / f"{command.key}.timings.json"
    timings.unlink(missing_ok=True)
    profile = None if profile_dir is None else profile_dir / f"{command.key.replace('@', '_')}.prof"
    status, seconds = run_process(argv, work, work / "logs" / f"{command.key}.log", echo, timings, profile)
    result = StageResult(command.key, shlex.join(argv), seconds, status)
    if timings.is_file():
        result.phases = json.loads(timings.read_text())
    result.metrics = read_metrics(work, command.metrics)
    for out in command.outs + command.metrics:
        if (work / out).exists():
            result.outputs_mb[out] = round(size_mb(work / out), 3)
        else:
            result.missing_outputs.append(out)
    result.stage_timer_seconds = stage_timer(command.stage, result.metrics)
    if result.stage_timer_seconds is not None:
        result.outside_timer_seconds = seconds - result.stage_timer_seconds
    return result


def haar_available() -> bool:
    """Whether stages.lib.imaging.faces can load its Haar cascade here (opencv < 5)."""
    from stages.lib.imaging.faces import face_cascade

    try:
        face_cascade()
    except RuntimeError:
        return False
    return True


def stage_without_haar(argv: list[str]) -> int:
    """``python -m stages <stage> ...`` with face detection finding no face (no Haar cascade in opencv 5):
    prep falls back to its saliency / centre crop, compare's face_detection_rate reads 0."""
    import gc

    from stages.lib.imaging import faces

    faces.detect_faces = lambda image, min_face_fraction=0.0, min_neighbors=5: []
    # nor dlib's detector (as on a host without it): import dlib raises ImportError
    sys.modules["dlib"] = None
    from stages.__main__ import main as stages_main

    status = stages_main(argv)
    gc.freeze()  # as stages/__main__.py does: skip the last collection of the torch object graph
    return status


# ------------------------------------------------------------------------------------------------ report


def device_name(device: str) -> str:
    """The GPU's name, asked in a child process (this one keeps no CUDA context), or the CPU's."""
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    if device != "cpu":
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[-1]
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    import torch

    found["torch_cuda"] = str(torch.version.cuda)
    return found


def import_probe(work: Path, stages: tuple[str, ...]) -> float:
    """Seconds for a fresh interpreter to import every stage module. It also writes the .pyc files that a wheel
    installed with ``--no-compile`` lacks, which the first stage to import a package would otherwise pay for."""
    code = "; ".join(f"import stages.{stage}" for stage in stages)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=work, env=stage_env(work), check=True)
    return time.perf_counter() - start


def default_out(gpu: str, args: argparse.Namespace) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")[:40]
    suffix = ("_tiny" if args.tiny else "") + (f"_scale{args.scale:g}" if args.scale != 1.0 else "")
    return ROOT / "benchmarks" / "results" / f"recipe_{slug}{suffix}.json"


KEY_METRICS = (
    "steps_per_s",
    "images_per_s",
    "num_images",
    "steps_run",
    "num_accepted",
    "num_face",
    "seconds",
)


def print_row(result: StageResult) -> None:
    shown = {k: result.metrics[k] for k in KEY_METRICS if isinstance(result.metrics.get(k), int | float)}
    extra = "  ".join(f"{k} {v:.3g}" for k, v in shown.items())
    outside = (
        ""
        if result.outside_timer_seconds is None
        else f"  (outside its timer {result.outside_timer_seconds:.1f} s)"
    )
    flag = "" if result.returncode == 0 and not result.missing_outputs else "  FAILED"
    print(f"  {result.key:<15} {result.seconds:8.1f} s{outside}  {extra}{flag}", flush=True)
    if result.phases:
        print(f"  {'':<15} {summary_line(result.phases)}", flush=True)


def print_failure(result: StageResult, work: Path) -> None:
    log = work / "logs" / f"{result.key}.log"
    tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
    print(
        f"stage {result.key} failed (exit {result.returncode}, missing {result.missing_outputs}); log {log}:"
    )
    print("\n".join(tail), file=sys.stderr)


# -------------------------------------------------------------------------------------------------- main


PHASE_COLUMNS = (
    "startup",
    "fingerprint",
    "load",
    "encode",
    "capture",
    "train",
    "validation",
    "checkpoint",
    "sampling",
    "save",
)


def markdown_table(report: dict[str, Any]) -> str:
    """docs/gpu-speed.md's table of a recipe JSON: each stage's wall time and its phases, in seconds."""
    lines = [
        f"{report['device']}, torch {report['versions'].get('torch')}, diffusers "
        f"{report['versions'].get('diffusers')}; `{report['profile']}` at scale {report['scale']:g}, "
        f"{report['model']}; seconds:",
        "",
        "| stage | wall | " + " | ".join(PHASE_COLUMNS) + " | other |",
        "|---|---:|" + "---:|" * (len(PHASE_COLUMNS) + 1),
    ]
    totals = dict.fromkeys((*PHASE_COLUMNS, "other"), 0.0)
    for stage in report["stages"].values():
        phases = stage.get("phases", {})
        # the rest of the stage's process, and what its own clock did not see (process exit)
        other = stage["seconds"] - sum(phases.get(k, 0.0) for k in PHASE_COLUMNS)
        values = [phases.get(k, 0.0) for k in PHASE_COLUMNS] + [other]
        for key, value in zip((*PHASE_COLUMNS, "other"), values, strict=True):
            totals[key] += value
        cells = " | ".join(f"{v:.1f}" if v >= 0.05 else "" for v in values)
        lines.append(f"| {stage['key']} | {stage['seconds']:.1f} | {cells} |")
    cells = " | ".join(f"**{totals[k]:.1f}**" for k in (*PHASE_COLUMNS, "other"))
    lines.append(f"| **all** | **{report['total_seconds']:.1f}** | {cells} |")
    return "\n".join(lines) + "\n"


@contextmanager
def workspace(path: Path | None) -> Iterator[Path]:
    """``--work`` (kept; an earlier workspace of this benchmark is emptied first) or a temporary folder (removed)."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
            yield Path(tmp)
        return
    path = path.resolve()
    if path.exists() and any(path.iterdir()):
        if not (path / WORKSPACE_MARK).is_file():
            raise SystemExit(
                f"--work {path}: not empty and not a workspace of this benchmark; choose another"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / WORKSPACE_MARK).write_text("benchmarks/recipe.py workspace: emptied by its next run\n")
    yield path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="composed seed_hw4 params (composed afresh where DVC is installed)")  # fmt: skip
    parser.add_argument("--compose-only", action="store_true", help="compose --params and stop")
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the Markdown table of a result JSON"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="class-image count and training steps x F")
    parser.add_argument(
        "--tiny", action="store_true", help="smoke run: tiny random model, 64 px, 2 sampling steps"
    )
    parser.add_argument("--device", default="auto", help="compute.device: auto | cpu | cuda")
    parser.add_argument(
        "--work", type=Path, help="workspace to keep (emptied first); default: a temporary one"
    )
    parser.add_argument(
        "--out", type=Path, help="result JSON (default benchmarks/results/recipe_<device>.json)"
    )
    parser.add_argument("--leave-out", nargs="*", default=[], choices=OPTIONAL_STAGES, help="optional stages")
    parser.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="params values (repeatable)",
    )
    parser.add_argument(
        "--force-no-haar", action="store_true", help="run prep / compare as without opencv's cascades"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show each stage's output (always in <work>/logs)"
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="write each stage's cProfile stats to DIR/<stage>.prof (read them with python -m pstats)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale {args.scale}: must be in (0, 1]")
    return args


def prepare_params(args: argparse.Namespace) -> dict[str, Any]:
    """Compose (where DVC is) or read the profile's params."""
    if dvc_available():
        compose_params(args.params)
    return read_params(args.params)


def missing_for_compare() -> str:
    """Why compare cannot run here ('' when it can): its image metrics use ``cv2.HOGDescriptor``, which OpenCV 5
    no longer has (the project pins opencv < 5; a GPU host's preinstalled one may be 5)."""
    import cv2

    return "" if hasattr(cv2, "HOGDescriptor") else f"opencv {cv2.__version__} has no HOGDescriptor"


def left_out_stages(args: argparse.Namespace) -> dict[str, str]:
    """The optional stages this run leaves out, with the reason: asked (--leave-out) or not runnable here."""
    left = {stage: "--leave-out" for stage in args.leave_out}
    if "compare" not in left and (reason := missing_for_compare()):
        left["compare"] = reason
    return left


def new_report(args: argparse.Namespace, params: dict[str, Any], changes: dict[str, Any], haar: bool) -> dict:
    """The report's header: what ran where, and every value changed from the composed seed_hw4 params."""
    faces = "haar" if haar else "none (no Haar cascade in this opencv): prep crops by saliency / centre"
    return {
        "benchmark": "recipe", "profile": "seed_hw4", "model": "tiny random" if args.tiny else "sd15 random fp16",
        "scale": args.scale, "full_size": args.scale == 1.0 and not args.tiny, "device": device_name(args.device),
        "versions": versions(), "git_commit": source_commit(), "face_detection": faces,
        "left_out": left_out_stages(args), "changed_params": changes,
        "notes": NOTES, "config": params, "complete": False, "stages": {},
    }  # fmt: skip


def setup(report: dict, params: dict[str, Any], work: Path, stages: tuple[str, ...]) -> None:
    """Write params.yaml and the base source, warm the imports (not timed as stages)."""
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    print(
        f"recipe benchmark: {report['model']}, scale {report['scale']:g}, {report['device']}, workspace {work}"
    )
    written = write_base_source(params, work)
    report["setup"] = {"write_base_source": written, "import_stages_s": import_probe(work, stages)}
    print(f"  setup: base source written in {written['seconds']:.1f} s ({written['mb']:.0f} MB), "
          f"importing the stages {report['setup']['import_stages_s']:.1f} s", flush=True)  # fmt: skip


def save_report(report: dict, out: Path) -> None:
    """Write the report so far (after every stage: a run killed by a time limit keeps what it measured)."""
    report["total_seconds"] = sum(s["seconds"] for s in report["stages"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


def run_recipe(
    args: argparse.Namespace, work: Path, params: dict[str, Any], changes: dict[str, Any]
) -> tuple[dict, Path]:
    """Set up, then run every stage in dvc.yaml's order, stopping at the first failure; the report and its file."""
    haar = haar_available() and not args.force_no_haar
    report = new_report(args, params, changes, haar)
    out = args.out or default_out(report["device"], args)
    wanted = tuple(s for s in RECIPE_STAGES if s not in report["left_out"])
    for stage, reason in report["left_out"].items():
        if reason != "--leave-out":
            print(f"  leaving out {stage}: {reason}")
    setup(report, params, work, wanted)
    for command in stage_commands(params, wanted, ROOT / "dvc.yaml"):
        result = run_stage(
            command, work, haar, args.verbose, args.profile.resolve() if args.profile else None
        )
        report["stages"][command.key] = asdict(result)
        print_row(result)
        if result.returncode != 0 or result.missing_outputs:
            print_failure(result, work)
            report["failed"] = command.key
        save_report(report, out)
        if "failed" in report:
            break
    report["complete"] = "failed" not in report
    save_report(report, out)
    return report, out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WITHOUT_HAAR]:
        return stage_without_haar(argv[1:])
    args = parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())), end="")
        return 0
    base = prepare_params(args)
    if args.compose_only:
        print(f"wrote {args.params}")
        return 0
    params, changes = benchmark_params(base, args)
    with workspace(args.work) as work:
        report, out = run_recipe(args, work, params, changes)
    print(f"  {'total':<15} {report['total_seconds']:8.1f} s  (scale {args.scale:g}; {out})")
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
