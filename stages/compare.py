"""Stage `compare`: DreamBooth UNet vs the featured LoRA per prompt, the rank study, and metrics per variant.

Reads infer's ``index.json``; writes ``README.md`` (Markdown, image links), ``index.html`` (self-contained, images
inlined), ``comparison.png``, ``rank_study.png``, ``metrics.json`` (``{variant: {metric: value}}``) and
``headline.json`` (a few flat numbers that tell experiments apart, for ``dvc exp show`` and ``dvc metrics show``)
into the reports folder and logs them, with the metrics as ``<variant>.<metric>``, to MLflow.
The identity score (stages/lib/metrics/identity.py: dlib face embeddings against the prepared photos') covers the instance
prompts and, as the language-drift check, the class prompt; where it cannot apply the report says why.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import StageError
from stages.lib.imaging.images import save_image
from stages.lib.layout import featured_lora_dir
from stages.lib.metrics.identity import CLASS_PREFIX, IdentityScorer
from stages.lib.metrics.identity import DESCRIPTIONS as IDENTITY_METRICS
from stages.lib.metrics.image_metrics import METRICS, MetricSuite, encode_references, load_references
from stages.lib.miniature.attribute_reader import READER_DIR, AttributeReader, load_reader
from stages.lib.miniature.world_metrics import DESCRIPTIONS as WORLD_METRICS
from stages.lib.miniature.world_metrics import Reading, class_scores, fidelity_scores, subject_scores
from stages.lib.models.loading import resolve_device
from stages.lib.runtime.cli import stage_main
from stages.lib.sampling.inference import InferIndex
from stages.lib.tracking.tracker import stage_run

Cell = str | list[Path]
REPORT_FILES = ("README.md", "index.html", "comparison.png", "rank_study.png", "headline.json")
HEADLINE = "headline.json"
# headline.json: <column>_<metric> for these metrics of DreamBooth and the featured LoRA; short names, unique among
# the pipeline's metrics files, so that `dvc exp show` shows them without a path and narrow
HEADLINE_METRICS = {"subject_similarity": "similarity", "subject_rate": "subject_rate"}
LABELS = {"base": "base model", "dreambooth": "DreamBooth UNet", "lora_extracted": "LoRA extracted"}


@dataclass(frozen=True)
class ComparePaths:
    infer: Path
    prepared: Path
    # its VAE encodes the prepared photos for subject_latent_rms; its attribute reader scores the miniature world
    base: Path | None
    reports: Path


def label(variant: str) -> str:
    """The column title of a variant: "DreamBooth UNet", "LoRA r24", ..."""
    return LABELS.get(variant, variant.replace("lora_", "LoRA "))


@dataclass
class Section:
    """One part of the report: text, a table (cells are text or images), an image and notes."""

    title: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[Cell]] = field(default_factory=list)
    image: Path | None = None
    notes: list[str] = field(default_factory=list)


def featured_variant(cfg: PipelineConfig, index: InferIndex) -> str | None:
    """``lora_r<lora.rank>``; None when infer made no LoRA variant at all."""
    name = f"lora_{featured_lora_dir(cfg.lora, Path('models/lora')).name}"
    if name in index.variants or not index.lora_ranks:
        return name if name in index.variants else None
    raise StageError(
        f"{index.root}: infer generated {sorted(index.lora_ranks)} but not {name} (lora.rank={cfg.lora.rank}); "
        "set infer.all_ranks=true or regenerate: dvc repro -f infer"
    )


def rank_study_prompt(cfg: PipelineConfig, prompts: list[str]) -> str:
    """The first prompt containing ``compare.rank_study_prompt``."""
    wanted = cfg.compare.rank_study_prompt.lower()
    for prompt in prompts:
        if wanted in prompt.lower():
            return prompt
    raise StageError(f"compare.rank_study_prompt='{cfg.compare.rank_study_prompt}' is in none of {prompts}")


def build_suite(
    cfg: PipelineConfig, index: InferIndex, paths: ComparePaths
) -> tuple[MetricSuite, AutoencoderKL | None]:
    """Offline metrics always; CLIP / DINO when their folders load; latents when the base VAE is given. Returns the
    suite and the base VAE it loaded (None without ``--base``), which the reference row decodes with."""
    references = load_references(paths.prepared)
    if not references:
        raise StageError(f"{paths.prepared}: no prepared instance images; run `dvc repro prep` first")
    device = resolve_device(cfg.compute)
    c = cfg.compare
    suite = MetricSuite.create(
        references, cfg.data.instance_token, c.clip_model_path, c.dino_model_path, device
    )
    if paths.base is None:
        suite.skipped["subject_latent_rms"] = "no --base model given (its VAE encodes the prepared photos)"
        return suite, None
    vae = AutoencoderKL.from_pretrained(paths.base / "vae", local_files_only=True).to(device)
    height, width = int(index.settings["height"]), int(index.settings["width"])
    suite.reference_latents = encode_references(vae, references, height, width)
    return suite, vae


def world_scores(
    reader: AttributeReader, subject: Reading, index: InferIndex, variant: str, token: str
) -> dict[str, float]:
    """The miniature world's metrics of one variant, read off its images by the attribute reader."""
    readings = {p: reader.read(ims) for p, ims in index.images(variant).items()}
    with_token = [r for p, rs in readings.items() if token in p.split() for r in rs]
    scores = {**subject_scores(with_token, subject), **fidelity_scores(readings)}
    probe = index.class_prompt_images(variant)
    return scores | (class_scores(reader.read(probe), subject) if len(probe) > 1 else {})


def identity_scores(scorer: IdentityScorer, index: InferIndex, variant: str, token: str) -> dict[str, float]:
    """``identity_*`` of the variant's instance-prompt images and ``class_identity_*`` of its class-prompt images."""
    images = [im for p, ims in index.images(variant).items() if token in p.split() for im in ims]
    return scorer.score(images) | scorer.score(index.class_prompt_images(variant), CLASS_PREFIX)


def load_identity(
    suite: MetricSuite, index: InferIndex, miniature: bool, token: str = ""
) -> tuple[IdentityScorer | None, list[str]]:
    """The identity scorer and the report's notes on it; where it cannot apply, the reason in ``suite.skipped``."""
    scorer, reason = IdentityScorer.create(suite.references)
    if token and not any(token in p.split() for p in index.prompts):
        suite.skipped["identity_* (instance prompts)"] = (
            f"no infer prompt contains data.instance_token '{token}'"
        )
    if scorer is None:
        suite.skipped["identity_*"] = str(reason)
        return None, []
    notes = [
        f"identity references: dlib finds a face in {len(scorer.references)} of {scorer.num_photos} prepared photos"
    ]
    if not index.class_images:
        suite.skipped["class_identity_*"] = "infer made no class-prompt images (infer.class_prompt_images=0)"
    if miniature:
        notes.append(
            "the miniature world's drawn faces: dlib detects them, but its same-person distance 0.6 is calibrated on "
            "photographs; other drawn people fall within it too (docs/faces.md), so read `identity_distance`, not "
            "`identity_match_rate`"
        )
    return scorer, notes


REFERENCE_ROW = "prepared_photos"  # the subject metrics' ceiling, beside the variants in metrics.json


@torch.no_grad()
def reference_scores(
    reader: AttributeReader, subject: Reading, vae: AutoencoderKL, latents: torch.Tensor
) -> dict[str, float]:
    """``subject_rate`` / ``subject_match`` of the prepared photos themselves, decoded from their VAE latents: the
    domain generated images come from and the reader is trained on (clean photos read worse: README)."""
    pixels = vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1).cpu()
    return subject_scores(reader.read(pixels), subject)


def load_world_reader(base: Path | None, suite: MetricSuite) -> tuple[AttributeReader, Reading] | None:
    """The base model's attribute reader and subject, or None (noted as skipped) when it has none."""
    loaded = load_reader(base / READER_DIR) if base is not None else None
    if loaded is None:
        suite.skipped["subject_rate etc."] = (
            f"no attribute reader in {base}/{READER_DIR} (only the embedded miniature world has one)"
        )
        return None
    reader, info = loaded
    return reader, dict(info["subject"])


def comparison_section(index: InferIndex, columns: list[str], reports: Path) -> Section:
    """The seed's table: rows = prompts, columns = DreamBooth and the featured LoRA (also as one image)."""
    save_image(index.grid(columns, index.prompts), reports / "comparison.png")
    rows: list[list[Cell]] = [[p, *(index.files(v, p) for v in columns)] for p in index.prompts]
    header = ["prompt", *map(label, columns)]
    return Section(" vs ".join(header[1:]), "Rows: prompts; one column per model.", header, rows)


def rank_study_section(cfg: PipelineConfig, index: InferIndex, reports: Path) -> Section:
    """Every generated LoRA rank (and DreamBooth for reference) on one prompt."""
    prompt = rank_study_prompt(cfg, index.prompts)
    title = f"Rank study: {prompt}"
    ranked = sorted(index.lora_ranks, key=index.lora_ranks.__getitem__)
    if not ranked:
        return Section(title, notes=["skipped: infer generated no LoRA variant"])
    columns = [v for v in ("dreambooth",) if v in index.variants] + ranked
    path = save_image(index.grid(columns, [prompt]), reports / "rank_study.png")
    return Section(title, f"Columns: {', '.join(columns)}; rows: image index.", image=path)


def metrics_sections(
    metrics: dict[str, dict[str, float]],
    suite: MetricSuite,
    index: InferIndex,
    extra: list[str] | None = None,
) -> list[Section]:
    described = {**METRICS, **IDENTITY_METRICS, **WORLD_METRICS}
    names = [m for m in described if any(m in row for row in metrics.values())]
    rows: list[list[Cell]] = [
        [v, *(f"{row[m]:.4f}" if m in row else "-" for m in names)] for v, row in metrics.items()
    ]
    notes = [f"computed `{m}`: {described[m]}" for m in names]
    notes += [f"skipped `{m}`: {why}" for m, why in suite.skipped.items()]
    notes += [f"variant `{v}` not generated: {why}" for v, why in index.skipped.items()]
    notes += extra or []
    if REFERENCE_ROW in metrics:
        notes.append(
            f"row `{REFERENCE_ROW}`: the prepared photos themselves through the base VAE, read like the variants: "
            "the ceiling of `subject_rate` / `subject_match`"
        )
    return [
        Section("Metrics per variant", header=["variant", *names], rows=rows),
        Section("Metrics computed and skipped", notes=notes),
    ]


def _md_cell(cell: Cell, where: Path) -> str:
    if isinstance(cell, str):
        return cell.replace("|", "\\|")
    return " ".join(f"![]({Path(os.path.relpath(f, where)).as_posix()})" for f in cell)


def render_markdown(title: str, sections: list[Section], where: Path) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""] + ([s.text, ""] if s.text else [])
        if s.header:
            lines += ["| " + " | ".join(s.header) + " |", "|" + "---|" * len(s.header)]
            lines += ["| " + " | ".join(_md_cell(c, where) for c in row) + " |" for row in s.rows] + [""]
        lines += [_md_cell([s.image], where), ""] if s.image else []
        lines += [f"- {n}" for n in s.notes] + ([""] if s.notes else [])
    return "\n".join(lines)


def data_uri(path: Path) -> str:
    """The image as an inline JPEG data URI (keeps the page self-contained and small)."""
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _html_text(text: str) -> str:
    """Escaped text with Markdown `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, str):
        return html.escape(cell)
    return "".join(f'<img src="{data_uri(f)}" alt="{html.escape(f.name)}">' for f in cell)


def render_html(title: str, sections: list[Section]) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px;vertical-align:top}img{min-width:128px;max-width:256px;margin:2px;image-rendering:pixelated}"
        ".wide img{max-width:100%}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>" + (f"<p>{html.escape(s.text)}</p>" if s.text else ""))
        if s.header:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in s.header)
            body = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>" for r in s.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        parts.append(f"<div class='wide'>{_html_cell([s.image])}</div>" if s.image else "")
        parts.append(
            "<ul>" + "".join(f"<li>{_html_text(n)}</li>" for n in s.notes) + "</ul>" if s.notes else ""
        )
    return "".join(parts) + "</body></html>\n"


def headline(metrics: dict[str, dict[str, float]], featured: str | None) -> dict[str, float]:
    """The few numbers that tell experiments apart: subject similarity and subject rate of DreamBooth (``db_``)
    and of the featured LoRA (``lora_``, whatever its rank), those that were measured."""
    columns = {"dreambooth": "db", featured: "lora"}
    return {
        f"{column}_{short}": metrics[variant][metric]
        for variant, column in columns.items()
        for metric, short in HEADLINE_METRICS.items()
        if variant in metrics and metric in metrics[variant]
    }


def run(cfg: PipelineConfig, paths: ComparePaths) -> dict[str, dict[str, float]]:
    """Write the comparison report and the metrics of every variant."""
    index = InferIndex.load(paths.infer)
    columns = [v for v in ("dreambooth", featured_variant(cfg, index)) if v in index.variants]
    if not columns:
        raise StageError(f"{paths.infer}: infer generated neither dreambooth nor a LoRA variant to compare")
    suite, vae = build_suite(cfg, index, paths)
    params = {
        **to_flat_dict(cfg.compare, "compare."),
        "lora.rank": cfg.lora.rank,
        "variants": list(index.variants),
    }
    for name in REPORT_FILES:  # nothing stale from an earlier run (e.g. a rank study that is now skipped)
        (paths.reports / name).unlink(missing_ok=True)
    with stage_run("compare", cfg.tracking, params, paths.reports) as tracker:
        metrics = {v: suite.score(index.images(v), index.latents(v)) for v in index.variants}
        world = load_world_reader(paths.base, suite)
        identity, identity_notes = load_identity(suite, index, world is not None, cfg.data.instance_token)
        if identity is not None:
            for v in index.variants:
                metrics[v] |= identity_scores(identity, index, v, cfg.data.instance_token)
        if world is not None:
            for v in index.variants:
                metrics[v] |= world_scores(*world, index, v, cfg.data.instance_token)
            if vae is not None:
                metrics[REFERENCE_ROW] = reference_scores(*world, vae, suite.reference_latents)
        sections = [
            comparison_section(index, columns, paths.reports),
            rank_study_section(cfg, index, paths.reports),
        ]
        sections += metrics_sections(metrics, suite, index, identity_notes)
        top = headline(metrics, featured_variant(cfg, index))
        (paths.reports / HEADLINE).write_text(json.dumps(top, indent=2, sort_keys=True) + "\n")
        title = "DreamBooth vs LoRA comparison"
        (paths.reports / "README.md").write_text(render_markdown(title, sections, paths.reports))
        (paths.reports / "index.html").write_text(render_html(title, sections))
        for name in REPORT_FILES:
            if (paths.reports / name).is_file():
                tracker.log_artifact(paths.reports / name, "compare")
        tracker.set_final_metrics(
            metrics
        )  # one object per variant in metrics.json, "<variant>.<metric>" in MLflow
    return metrics


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--infer", type=Path, default=Path("data/infer"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--base", type=Path, default=Path("models/base"), help="its VAE encodes the photos")
    parser.add_argument("--reports", type=Path, default=Path("reports/compare"))


def _run(cfg: PipelineConfig, a: argparse.Namespace) -> dict[str, dict[str, float]]:
    return run(cfg, ComparePaths(a.infer, a.prepared, a.base, a.reports))


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__ or "", _add_arguments, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
