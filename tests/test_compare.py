"""Stages `infer` and `compare` on a tiny trained world: every variant and prompt in the report, finite declared
metrics, the trained model ranked above the base model, CLIP / DINO with tiny random local models."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from omegaconf.errors import InterpolationResolutionError
from PIL import Image
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    Dinov2Config,
    Dinov2Model,
)

from stages import compare, dreambooth, infer, lora
from stages.compose import compose
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import StageError
from stages.lib.metrics.image_metrics import embed, subject_similarity
from stages.lib.models.tokenizer import build_clip_tokenizer
from stages.lib.sampling.inference import InferIndex, prompt_slugs
from stages.sample_subject import SUBJECT, FaceAttributes, compose_photo

from .conftest import PROJECT_ROOT
from .test_faces import astronaut
from .test_identity import TRANSFORMS, grace_hopper, write_infer_index
from .training_fixtures import TinyWorld, new_world

OFFLINE_METRICS = {"face_detection_rate", "subject_similarity", "diversity", "subject_latent_rms"}
VARIANTS = ["base", "dreambooth", "lora_r4", "lora_r8", "lora_r24"]


@dataclass
class Compared:
    world: TinyWorld
    infer_paths: infer.InferPaths
    compare_paths: compare.ComparePaths
    metrics: dict[str, dict[str, float]]


def _train(world: TinyWorld) -> None:
    """DreamBooth long enough to learn the subject; LoRA adapters of two steps (loading is what matters here)."""
    cfg = world.cfg
    for train in (cfg.dreambooth, cfg.lora.train):
        train.num_validation_images = 0
    dreambooth.run(cfg, world.base_dir, world.root / "models" / "dreambooth", world.paths("dreambooth"))
    lora_cfg = copy.deepcopy(cfg)
    lora_cfg.lora.train.max_train_steps = 2
    for rank in cfg.lora.ranks:
        out = world.root / "models" / "lora" / f"r{rank}"
        lora.run(lora_cfg, rank, world.root / "models" / "dreambooth", out, world.paths(f"lora_r{rank}"))


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Compared:
    world = new_world(tmp_path_factory, "compare")
    root, cfg = world.root, world.cfg
    _train(world)
    cfg.tracking.enabled, cfg.tracking.uri = True, f"sqlite:///{root / 'mlflow.db'}"
    cfg.infer.num_inference_steps = 3
    models = root / "models"
    paths = infer.InferPaths(
        models / "base", models / "dreambooth", models / "lora", models / "export" / "none", root / "infer",
        root / "reports" / "infer",
    )  # fmt: skip
    infer.run(cfg, paths)
    cpaths = compare.ComparePaths(paths.out, world.prepared, paths.base, root / "reports" / "compare")
    return Compared(world, paths, cpaths, compare.run(cfg, cpaths))


def test_infer_writes_every_variant_with_index_and_grids(compared) -> None:
    index = InferIndex.load(compared.infer_paths.out)
    cfg = compared.world.cfg
    assert list(index.variants) == VARIANTS
    assert index.lora_ranks == {"lora_r4": 4, "lora_r8": 8, "lora_r24": 24}
    assert "lora_extracted" in index.skipped and "convert" in index.skipped["lora_extracted"]
    for variant in VARIANTS:
        for prompt, slug in zip(cfg.infer.prompts, prompt_slugs(cfg.infer.prompts), strict=True):
            files = index.files(variant, prompt)
            assert [f.relative_to(index.root).as_posix() for f in files] == [
                f"{variant}/{slug}/{i:02d}.png" for i in range(cfg.infer.num_images_per_prompt)
            ]
            assert all(f.is_file() for f in files)
    grids = {p.stem for p in (compared.infer_paths.reports / "grids").glob("*.png")}
    assert {f"variant_{v}" for v in VARIANTS} | {
        f"prompt_{s}" for s in prompt_slugs(cfg.infer.prompts)
    } == grids


def test_report_shows_every_prompt_and_variant(compared) -> None:
    reports = compared.compare_paths.reports
    cfg = compared.world.cfg
    markdown, page = (reports / "README.md").read_text(), (reports / "index.html").read_text()
    assert "| prompt | DreamBooth UNet | LoRA r24 |" in markdown
    for text in (markdown, page):
        assert all(prompt in text for prompt in cfg.infer.prompts)
        assert all(variant in text for variant in VARIANTS)
        assert "Rank study: a photo of sks man face in a forest" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 1 + 2 * cfg.infer.num_images_per_prompt * len(cfg.infer.prompts) and all(
        (reports / link).is_file() for link in links
    )
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(links) and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert (reports / "rank_study.png").is_file() and (reports / "comparison.png").is_file()


def test_metrics_file_has_declared_keys_with_finite_values(compared) -> None:
    data = json.loads((compared.compare_paths.reports / "metrics.json").read_text())
    assert list(data) == sorted(VARIANTS) and data == json.loads(json.dumps(compared.metrics, sort_keys=True))
    for variant, row in data.items():
        assert OFFLINE_METRICS <= set(row), (variant, row)
        assert all(math.isfinite(v) for v in row.values()), (variant, row)
    markdown = (compared.compare_paths.reports / "README.md").read_text()
    for name in ("clip_i", "clip_t", "dino"):
        assert re.search(rf"skipped `{name}`: compare\.(clip|dino)_model_path is empty", markdown)
    assert all(f"computed `{name}`" in markdown for name in OFFLINE_METRICS)


def test_identity_score_is_skipped_with_its_reason_when_the_photos_show_no_face(compared) -> None:
    """The fixture's subject is an orange box, not a face: no identity score, and the report says why."""
    markdown = (compared.compare_paths.reports / "README.md").read_text()
    assert "skipped `identity_*`: dlib finds no face in any of the 6 prepared photos" in markdown
    assert not any(
        key.startswith(("identity", "class_identity")) for row in compared.metrics.values() for key in row
    )


def test_identity_score_of_real_photos_in_metrics_report_and_mlflow(tmp_path) -> None:
    """compare on photographs: the astronaut prepared, her copies, Grace Hopper and a blank image "generated"."""
    cfg = PipelineConfig()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for i, image in enumerate([astronaut(), TRANSFORMS["mirror"](astronaut())]):
        image.resize((160, 160)).save(prepared / f"{i:03d}.png")
    generated = {
        "a photo of sks man face in a forest": [
            TRANSFORMS["jpeg q40"](astronaut()),
            Image.new("RGB", (160, 160)),
        ],
        "a photo of sks man face in a kitchen": [
            grace_hopper(),
            TRANSFORMS["rotated 30 degrees"](astronaut()),
        ],
    }
    write_infer_index(tmp_path / "infer", generated, [grace_hopper(), astronaut()])
    paths = compare.ComparePaths(tmp_path / "infer", prepared, None, tmp_path / "reports")
    metrics = compare.run(cfg, paths)["dreambooth"]
    assert (metrics["identity_match_rate"], metrics["identity_no_face"]) == (0.5, 1.0)
    assert (metrics["class_identity_match_rate"], metrics["class_identity_no_face"]) == (0.5, 0.0)
    assert 0.6 < metrics["identity_similarity"] < 0.75 and 0.3 < metrics["identity_distance"] < 0.45
    saved = json.loads((tmp_path / "reports" / "metrics.json").read_text())["dreambooth"]
    assert saved["identity_similarity"] == pytest.approx(metrics["identity_similarity"])
    for page in ("README.md", "index.html"):
        text = (tmp_path / "reports" / page).read_text()
        assert "identity references: dlib finds a face in 2 of 2 prepared photos" in text
        assert "identity_match_rate" in text and "class_identity_similarity" in text
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'compare'")
    assert runs["metrics.dreambooth.class_identity_distance"][0] == pytest.approx(
        metrics["class_identity_distance"]
    )


def test_headline_file_holds_the_few_numbers_dvc_exp_show_compares(compared) -> None:
    data = json.loads((compared.compare_paths.reports / "headline.json").read_text())
    metrics = compared.metrics
    assert data["db_similarity"] == metrics["dreambooth"]["subject_similarity"]
    assert set(data) <= {"db_similarity", "db_subject_rate", "lora_similarity", "lora_subject_rate"}
    assert {"db_similarity", "lora_similarity"} <= set(data) and all(math.isfinite(v) for v in data.values())


def test_trained_model_is_closer_to_the_subject_than_the_base_model(compared) -> None:
    rms = {v: row["subject_latent_rms"] for v, row in compared.metrics.items()}
    assert rms["dreambooth"] < 0.8 * rms["base"], rms


def test_compare_run_is_logged_to_mlflow(compared) -> None:
    mlflow.set_tracking_uri(compared.world.cfg.tracking.uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'compare'")
    assert len(runs) == 1 and runs["status"][0] == "FINISHED"
    assert runs["metrics.dreambooth.subject_latent_rms"][0] == pytest.approx(
        compared.metrics["dreambooth"]["subject_latent_rms"]
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs["run_id"][0], "compare")}
    assert {"compare/index.html", "compare/README.md", "compare/rank_study.png"} <= artifacts


def test_extracted_lora_loads_onto_the_base_model_when_present(compared, tmp_path) -> None:
    cfg = copy.deepcopy(compared.world.cfg)
    cfg.tracking.enabled = False
    cfg.infer.variants, cfg.infer.prompts, cfg.infer.num_images_per_prompt = ["lora_extracted"], ["a sks"], 1
    extracted = tmp_path / "lora_extracted" / "r8"
    shutil.copytree(compared.infer_paths.lora_root / "r8", extracted)  # any diffusers-format LoRA will do
    paths = replace(compared.infer_paths, extracted=extracted, out=tmp_path / "o", reports=tmp_path / "r")
    infer.run(cfg, paths)
    assert list(InferIndex.load(tmp_path / "o").variants) == ["lora_extracted"]


def test_untrained_featured_rank_is_a_clear_error(compared, tmp_path, capsys) -> None:
    cfg = copy.deepcopy(compared.world.cfg)
    cfg.lora.rank = 16
    with pytest.raises(StageError, match=r"lora\.rank=16 is not trained .*lora\.ranks=\[4,8,16,24\]"):
        infer.run(cfg, compared.infer_paths)
    with pytest.raises(StageError, match=r"lora\.rank=16 is not trained"):
        compare.run(cfg, compared.compare_paths)
    params = compose(tmp_path / "params.yaml", ["tracking.enabled=false"], root=PROJECT_ROOT)
    params.write_text(params.read_text().replace("  rank: 24\n", "  rank: 16\n", 1))  # edited by hand
    reports = ["--reports", str(tmp_path / "r")]
    assert compare.main(["--params", str(params), "--infer", str(compared.infer_paths.out), *reports]) == 2
    assert "lora.rank=16 is not trained" in capsys.readouterr().err
    with pytest.raises(InterpolationResolutionError, match=r"lora\.rank=16 is not trained"):
        compose(tmp_path / "p2.yaml", ["lora.rank=16"], root=PROJECT_ROOT)  # `dvc exp run -S` stops before


def _tiny_clip(folder: Path) -> Path:
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=build_clip_tokenizer(folder / "bpe")).save_pretrained(
        folder
    )
    return folder


def _tiny_dino(folder: Path) -> Path:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def _subset(index: InferIndex, root: Path, variants: list[str]) -> Path:
    """A copy of infer's output with only ``variants`` and the forest prompt (keeps the test fast)."""
    prompts = [p for p in index.prompts if "forest" in p]
    for variant in variants:
        shutil.copytree(index.root / variant, root / variant)
    ranks = {v: r for v, r in index.lora_ranks.items() if v in variants}
    files = {v: {p: index.variants[v][p] for p in prompts} for v in variants}
    InferIndex(root, prompts, files, {p: index.seeds[p] for p in prompts}, index.settings, ranks).write()
    return root


def test_clip_and_dino_metrics_with_local_models(compared, tmp_path) -> None:
    cfg: PipelineConfig = copy.deepcopy(compared.world.cfg)
    cfg.tracking.enabled = False
    cfg.compare.clip_model_path = str(_tiny_clip(tmp_path / "clip"))
    cfg.compare.dino_model_path = str(_tiny_dino(tmp_path / "dino"))
    subset = _subset(
        InferIndex.load(compared.infer_paths.out), tmp_path / "infer", ["dreambooth", "lora_r24"]
    )
    metrics = compare.run(cfg, compare.ComparePaths(subset, compared.world.prepared, None, tmp_path / "r"))
    for row in metrics.values():
        assert {"clip_i", "clip_t", "dino"} <= set(row) and all(math.isfinite(v) for v in row.values())
        assert "subject_latent_rms" not in row
    markdown = (tmp_path / "r" / "README.md").read_text()
    assert "computed `clip_t`" in markdown and "skipped `subject_latent_rms`: no --base" in markdown


def test_subject_similarity_tells_the_sample_subject_from_another_person() -> None:
    def photos(attrs: FaceAttributes, seed: int, count: int) -> list:
        return [compose_photo(attrs, np.random.default_rng([seed, i]), 160, 160) for i in range(count)]

    references = np.stack([embed(im) for im in photos(SUBJECT, 7, 6)])
    other = FaceAttributes(
        skin=(235, 200, 175), hair=(35, 28, 22), hair_style="short", glasses=None, beard="none"
    )
    same = subject_similarity(np.stack([embed(im) for im in photos(SUBJECT, 99, 4)]), references)
    different = subject_similarity(np.stack([embed(im) for im in photos(other, 99, 4)]), references)
    assert same > different + 0.05, (same, different)
