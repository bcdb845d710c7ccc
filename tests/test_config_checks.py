"""Allowed values and ranges: checked when params.yaml is loaded, before any model loads, naming the full key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf.errors import InterpolationResolutionError

from stages.compose import compose
from stages.lib.config import checks
from stages.lib.config.loader import load_config
from stages.lib.errors import ConfigError

from .conftest import PROJECT_ROOT

BAD = [
    ("infer.guidance_scale=-3", r"infer\.guidance_scale=-3\.0 must be >= 0"),
    (
        "dreambooth.optimizer=adam9",
        r"dreambooth\.optimizer='adam9' is not allowed; use one of: adamw8bit, adamw",
    ),
    ("dreambooth.mixed_precision=bf61", r"dreambooth\.mixed_precision='bf61'.*no, fp16, bf16"),
    ("lora.train.lr_scheduler=cosin", r"lora\.train\.lr_scheduler='cosin'.*cosine"),
    ("controlnet.train.learning_rate=0", r"controlnet\.train\.learning_rate=0\.0 must be > 0"),
    ("lora.ranks=[4,8,99]", r"lora\.ranks contains 99: a rank must be in \[1, 32\]"),
    (
        "lora.ranks=[4,8]",
        r"lora\.rank=\d+ is not trained \(lora\.ranks=\[4, 8\]\)\. Add it: dvc exp run -S 'lora",
    ),
    ("infer.height=100", r"infer\.height=100 must be a positive multiple of 8"),
    (
        "controlnet.guidance_end=0",
        r"controlnet\.guidance_start=0\.0 must be below controlnet\.guidance_end=0\.0",
    ),
    ("prep.on_bad_input=ignore", r"prep\.on_bad_input='ignore'.*skip, fail"),
    ("controlnet.map_transform.scale=1.5", r"controlnet\.map_transform\.scale=1\.5 must be in \(0, 1\]"),
    (
        "controlnet.map_transform.shift_y=-0.6",
        r"controlnet\.map_transform\.shift_y=-0\.6 must be in \[-0\.5, 0\.5\]",
    ),
    ("controlnet.augment.min_scale=0", r"controlnet\.augment\.min_scale=0\.0 must be in \(0, 1\]"),
]


def _bad_params(tmp_path: Path, override: str) -> Path:
    """params.yaml as composed, then edited by hand to ``override`` (the load-time check, not the compose-time one)."""
    params = compose(tmp_path / "params.yaml", [], root=PROJECT_ROOT)
    data = yaml.safe_load(params.read_text())
    key, value = override.split("=", 1)
    *parents, leaf = key.split(".")
    node = data
    for name in parents:
        node = node[name]
    node[leaf] = yaml.safe_load(value)
    params.write_text(yaml.safe_dump(data))
    return params


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_at_load_naming_the_key(tmp_path: Path, override: str, message: str) -> None:
    params = _bad_params(tmp_path, override)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(params)
    assert str(params) in str(info.value), "the message names the params file"
    assert "\n" not in str(info.value), "one line"


@pytest.mark.parametrize(("override", "message"), [*BAD, ("+lora.rnak=8", r"unknown key 'lora\.rnak'")],
                         ids=[b[0] for b in BAD] + ["+lora.rnak=8"])  # fmt: skip
def test_bad_override_stops_the_composition_and_writes_nothing(
    tmp_path: Path, override: str, message: str
) -> None:
    """What `dvc exp run -S` does: the composition fails with the message, before params.yaml is written."""
    out = tmp_path / "params.yaml"
    out.write_text("previous: content\n")
    with pytest.raises(InterpolationResolutionError, match=message):
        compose(out, [override], root=PROJECT_ROOT)
    assert out.read_text() == "previous: content\n"


def test_every_profile_passes_the_checks(tmp_path: Path) -> None:
    for profile in ("tiny", "sd15", "seed_hw4"):
        load_config(compose(tmp_path / f"{profile}.yaml", [f"profile={profile}"], root=PROJECT_ROOT))


def test_a_rank_as_wide_as_sd15s_layers_is_allowed_only_there(tmp_path: Path) -> None:
    sd15 = compose(
        tmp_path / "a.yaml", ["profile=sd15", "lora.ranks=[4,320]", "lora.rank=320"], root=PROJECT_ROOT
    )
    assert load_config(sd15).lora.ranks == [4, 320]
    with pytest.raises(InterpolationResolutionError, match="model.source=tiny has 32 features"):
        compose(tmp_path / "b.yaml", ["lora.ranks=[4,64]", "lora.rank=64"], root=PROJECT_ROOT)


def test_a_stage_refuses_a_bad_value_before_loading_any_model(tmp_path: Path) -> None:
    """The stage exits with status 2 and the one-line message, without importing diffusers' pipelines."""
    params = _bad_params(tmp_path, "infer.guidance_scale=-3")
    before = params.read_text()
    run = subprocess.run(
        [sys.executable, "-m", "stages", "infer", "--params", str(params), "--base", str(tmp_path / "none"),
         "--dreambooth", str(tmp_path / "none"), "--lora-root", str(tmp_path / "none"),
         "--out", str(tmp_path / "out"), "--reports", str(tmp_path / "reports")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "infer.guidance_scale=-3.0 must be >= 0" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists() and params.read_text() == before


def test_the_name_lists_match_the_libraries() -> None:
    from diffusers.optimization import SchedulerType

    from stages.convert import DTYPES
    from stages.lib.imaging.annotators import ANNOTATORS
    from stages.prep import SAVE_OPTIONS

    assert set(checks.LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(checks.ANNOTATORS) == set(ANNOTATORS)
    assert set(checks.IMAGE_FORMATS) == set(SAVE_OPTIONS)
    assert set(checks.EXPORT_DTYPES) == set(DTYPES)


def test_the_committed_params_pass(tmp_path: Path) -> None:
    cfg = load_config(PROJECT_ROOT / "params.yaml")
    assert cfg.lora.rank in cfg.lora.ranks
    data = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    data["dreambooth"]["adam_beta2"] = 1.0
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"dreambooth\.adam_beta2=1\.0 must be in \[0, 1\)"):
        load_config(bad)
