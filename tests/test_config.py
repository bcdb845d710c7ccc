"""Config composition: params.yaml in sync with conf/, profiles, strict keys and types."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from stages.compose import compose
from stages.lib.config.loader import build_section, load_config
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import ConfigError

from .conftest import PROJECT_ROOT

PROFILES = ["tiny", "sd15", "seed_hw4"]


def test_committed_params_equal_composition_of_conf(tmp_path: Path) -> None:
    composed = yaml.safe_load(compose(tmp_path / "p.yaml", [], root=PROJECT_ROOT).read_text())
    committed = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    assert committed == composed, "params.yaml is stale: run `make params` (or `dvc exp run`) and commit it"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_composes_into_typed_config(tmp_path: Path, profile: str) -> None:
    cfg = load_config(compose(tmp_path / "p.yaml", [f"profile={profile}"], root=PROJECT_ROOT))
    assert isinstance(cfg, PipelineConfig)
    assert cfg.lora.rank in cfg.lora.ranks


def test_seed_profile_is_the_reference_recipe(tmp_path: Path) -> None:
    cfg = load_config(compose(tmp_path / "p.yaml", ["profile=seed_hw4"], root=PROJECT_ROOT))
    assert cfg.model.source == "single_file"
    assert (cfg.data.instance_prompt, cfg.data.class_prompt) == (
        "a photo of sks man face",
        "a photo of man face",
    )
    db = cfg.dreambooth
    assert (db.resolution, db.train_batch_size, db.learning_rate, db.max_train_steps) == (512, 1, 2e-6, 800)
    assert (db.optimizer, db.lr_scheduler, db.lr_warmup_steps, db.prior_loss_weight) == (
        "adamw8bit",
        "constant",
        0,
        1.0,
    )
    assert db.with_prior_preservation and cfg.class_images.num_class_images == 500
    assert (
        cfg.lora.train.learning_rate == 5e-4
        and cfg.lora.train.max_train_steps == 800
        and cfg.lora.ranks == [4, 8, 24]
        and cfg.lora.rank == 24
    )
    inf = cfg.infer
    assert (inf.num_images_per_prompt, inf.guidance_scale, inf.num_inference_steps) == (2, 7.5, 30)
    topics = ["kitchen", "anime", "classicist", "forest", "night city"]
    assert all(any(t in p and "sks" in p for p in inf.prompts) for t in topics)


def test_tiny_profile_is_the_default(tiny_params: Path) -> None:
    cfg = load_config(tiny_params)
    assert cfg.model.source == "tiny" and cfg.prep.resolution == 64


def test_override_changes_only_that_key(tmp_path: Path) -> None:
    base = yaml.safe_load(compose(tmp_path / "a.yaml", [], root=PROJECT_ROOT).read_text())
    over = yaml.safe_load(compose(tmp_path / "b.yaml", ["lora.rank=8"], root=PROJECT_ROOT).read_text())
    assert over["lora"]["rank"] == 8
    over["lora"]["rank"] = base["lora"]["rank"]
    assert over == base


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lora.rnak=8", "rnak"),
        ("lora.rank=abc", "lora.rank"),
        ("dreambooth.max_train_steps=1.5", "max_train_steps"),
    ],
)
def test_bad_override_fails_naming_the_key(tmp_path: Path, override: str, needle: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose(tmp_path / "p.yaml", [override], root=PROJECT_ROOT)
    assert needle in str(info.value) + str(info.value.__cause__)


def test_unknown_key_in_params_suggests_the_close_match() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'lora\.rnak'\. Did you mean 'rank'\?"):
        build_section("lora", {"rnak": 8})


def test_wrong_type_in_params_names_key() -> None:
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        build_section("lora", {"rank": "abc"})


def test_unknown_section_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("lorra:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key '\.?lorra'.*'lora'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_lora_and_controlnet_training_inherit_every_dreambooth_option(tmp_path: Path) -> None:
    """lora.train / controlnet.train state only their differences: an option set on dreambooth (even one conf/
    never names, like num_probes) reaches both; what they set themselves stays theirs."""
    overrides = ["dreambooth.num_probes=8", "dreambooth.resolution=96", "lora.train.resolution=128"]
    params = compose(tmp_path / "p.yaml", overrides, root=PROJECT_ROOT)
    cfg = load_config(params)
    assert (cfg.lora.train.num_probes, cfg.controlnet.train.num_probes) == (8, 8)
    assert (cfg.lora.train.resolution, cfg.controlnet.train.resolution) == (128, 96)
    # the LoRA rate, from the tiny profile
    assert cfg.lora.train.learning_rate != cfg.dreambooth.learning_rate
    assert not cfg.controlnet.train.train_text_encoder
    written = yaml.safe_load(params.read_text())
    assert written["lora"]["train"]["num_probes"] is None, "params.yaml: null = dreambooth's value"
    assert sum(v is not None for v in written["controlnet"]["train"].values()) < 10
