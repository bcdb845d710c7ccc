"""End to end, up to DreamBooth: prior preservation (DreamBooth trained again without it on the end-to-end clone's
inputs) and the LoRA rank-sweep benchmark on the clone's DreamBooth model. They need the clone only up to
`dreambooth` (conftest's ``e2e_clone_up_to_dreambooth``), so under `pytest -n 2` they run on the second worker
beside the rest of the build instead of after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import dreambooth_sweep, lora_rank_sweep
from stages import dreambooth
from stages.compose import compose
from stages.lib.config.loader import load_config
from stages.lib.config.schema import PipelineConfig
from stages.lib.miniature.attribute_reader import AttributeReader, load_reader
from stages.lib.miniature.world_metrics import class_scores
from stages.lib.models.loading import load_pipeline
from stages.lib.sampling.inference import generate, sampling_kwargs
from stages.lib.training.finetune import FinetunePaths

pytestmark = pytest.mark.slow
CLASS_PROMPT_IMAGES = 32  # per model: enough pairs for a stable diversity estimate
PRIOR_DIVERSITY_GAIN = 0.1  # class_diversity kept by prior preservation (measured 0.20)
PRIOR_DRIFT = 0.15  # class_subject_match gained without it (measured 0.22)


def _class_prompt_scores(
    cfg: PipelineConfig, reader: AttributeReader, subject: dict, model_dir: Path
) -> dict:
    """The class prompt's diversity and drift (world_metrics.class_scores), read by the base's attribute reader."""
    sampling = {**sampling_kwargs(cfg.infer), "num_images_per_prompt": CLASS_PROMPT_IMAGES}
    prompt = cfg.data.class_prompt
    images = generate(load_pipeline(model_dir), [prompt], **sampling).images[prompt]
    return class_scores(reader.read(images), subject)


def test_prior_preservation_keeps_the_class_prompt_varied(
    e2e_clone_up_to_dreambooth: Path, tmp_path: Path
) -> None:
    """DreamBooth without prior preservation drifts: its class prompt takes on the subject's attributes and loses
    the variety of identities that the same training with prior preservation keeps (DreamBooth's language drift).
    Measured on this test's build: diversity 0.64 with prior, 0.44 without; subject match 0.31 against 0.53."""
    repo = e2e_clone_up_to_dreambooth
    # the clone's own configuration (conf/ is never changed by its tests), composed here: params.yaml may be
    # rewritten meanwhile by the `dvc exp run` of test_pipeline_e2e.py
    params = compose(tmp_path / "no_prior.yaml", ["dreambooth.with_prior_preservation=false"], root=repo)
    cfg = load_config(params)
    cfg.tracking.enabled = False  # the clone's MLflow store belongs to its own runs
    paths = FinetunePaths(
        repo / "data/prepared", repo / "data/class_images", tmp_path / "ck", tmp_path / "rep"
    )
    dreambooth.run(cfg, repo / "models/base", tmp_path / "db", paths)
    reader, info = load_reader(repo / "models/base/attribute_reader")
    with_prior = _class_prompt_scores(cfg, reader, info["subject"], repo / "models/dreambooth")
    without = _class_prompt_scores(cfg, reader, info["subject"], tmp_path / "db")
    kept = with_prior["class_diversity"] - without["class_diversity"]
    assert kept > PRIOR_DIVERSITY_GAIN, (with_prior, without)
    drift = without["class_subject_match"] - with_prior["class_subject_match"]
    assert drift > PRIOR_DRIFT, (with_prior, without)


def test_lora_rank_sweep_benchmark_scores_each_adapter(
    e2e_clone_up_to_dreambooth: Path, tmp_path: Path
) -> None:
    """benchmarks/lora_rank_sweep.py trains one adapter per rank with the lora stage's code on the clone's
    DreamBooth model and scores it with compare's metrics, beside the DreamBooth model itself."""
    repo = e2e_clone_up_to_dreambooth
    params = compose(tmp_path / "params.yaml", [], root=repo)
    out = tmp_path / "sweep.json"
    args = ["--params", str(params), "--base", str(repo / "models/base"),
            "--dreambooth", str(repo / "models/dreambooth"), "--prepared", str(repo / "data/prepared"),
            "--class-images", str(repo / "data/class_images"), "--ranks", "4", "24", "--lrs", "1e-2",
            "--steps", "3", "--alpha", "4", "--images-per-prompt", "1", "--class-images-per-variant", "2", "--out", str(out)]  # fmt: skip
    assert lora_rank_sweep.main(args) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["rank"], r["steps"]) for r in rows] == [
        ("dreambooth", 0, 0),
        ("lr1e-02_s3_r4", 4, 3),
        ("lr1e-02_s3_r24", 24, 3),
    ]
    assert rows[2]["lora_params"] == 6 * rows[1]["lora_params"] > 0  # the same projections, 6x the rank
    assert rows[1]["alpha"] == rows[2]["alpha"] == 4
    for row in rows:
        assert 0 <= row["subject_rate"] <= 1 and 0 <= row["style_fidelity"] <= 1, row
        assert 0 <= row["class_diversity"] <= 1, row  # 2 class-prompt images: one pair


def test_dreambooth_sweep_benchmark_reruns_only_what_a_variant_changes(
    e2e_clone_up_to_dreambooth: Path, tmp_path: Path
) -> None:
    """benchmarks/dreambooth_sweep.py trains DreamBooth once per variant of Hydra overrides on the clone's inputs,
    making the sample subject, its crops or the class images again only where the overrides change them, and
    scores each variant beside the base model."""
    repo = e2e_clone_up_to_dreambooth
    out = tmp_path / "sweep.json"
    steps = "dreambooth.max_train_steps=3"
    args = ["--root", str(repo), "--base", str(repo / "models/base"), "--prepared", str(repo / "data/prepared"),
            "--class-images", str(repo / "data/class_images"), "--variant", "short", steps,
            "--variant", "uncaptioned", steps, "sample_subject.captions=false", "class_images.num_class_images=4",
            "--images-per-prompt", "1", "--class-images-per-variant", "2", "--out", str(out)]  # fmt: skip
    assert dreambooth_sweep.main(args) == 0
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert list(rows) == ["base", "short", "uncaptioned"]
    cfg = load_config(compose(tmp_path / "params.yaml", [], root=repo))
    assert rows["short"]["class_images"] == cfg.class_images.num_class_images  # the clone's own
    assert rows["short"]["captioned_photos"] > 0  # the clone's sample subject, with its scene captions
    assert (rows["uncaptioned"]["class_images"], rows["uncaptioned"]["captioned_photos"]) == (4, 0)
    for row in rows.values():
        assert 0 <= row["subject_match"] <= 1 and 0 <= row["scene_fidelity"] <= 1, row
    assert rows["short"]["train_s"] > 0 and rows["short"]["final_loss"] > 0
