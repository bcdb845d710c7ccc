"""The embedded sample subject (stages/sample_subject.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageOps

from stages import prep, sample_subject
from stages.compose import compose
from stages.lib.config.loader import load_config, save_params
from stages.lib.config.schema import PipelineConfig, SampleSubjectConfig
from stages.lib.errors import ConfigError
from stages.lib.imaging.faces import detect_faces
from stages.lib.miniature.face_render import SUBJECT, draw_face
from stages.sample_subject import EXIF_ORIENTATION_TAG, encode_orientation

from .conftest import PROJECT_ROOT

NUM = 6


@pytest.fixture
def cfg() -> PipelineConfig:
    """A small sample subject and the tiny prep resolution, tracking off."""
    config = PipelineConfig()
    config.tracking.enabled = False
    config.prep.resolution = 64
    config.sample_subject = SampleSubjectConfig(num_images=NUM, min_size=160, max_size=240, seed=7)
    return config


def contents(folder: Path, suffixes: tuple[str, ...] = (".jpg", ".png", ".txt")) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in suffixes}


def test_same_seed_gives_identical_bytes(cfg: PipelineConfig, tmp_path: Path) -> None:
    sample_subject.run(cfg, tmp_path / "a")
    sample_subject.run(cfg, tmp_path / "b")
    assert contents(tmp_path / "a") == contents(tmp_path / "b")
    cfg.sample_subject.seed = 8
    sample_subject.run(cfg, tmp_path / "c")
    other = contents(tmp_path / "c", (".jpg", ".png"))
    assert other.keys() == contents(tmp_path / "a", (".jpg", ".png")).keys()
    assert all(other[k] != v for k, v in contents(tmp_path / "a", (".jpg", ".png")).items())


def test_formats_sizes_and_exif(cfg: PipelineConfig, tmp_path: Path) -> None:
    paths = sample_subject.run(cfg, tmp_path / "subject")
    assert len(paths) == NUM and {p.suffix for p in paths} == {".jpg", ".png"}
    orientations = set()
    for path in paths:
        with Image.open(path) as image:
            orientations.add(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
            upright = ImageOps.exif_transpose(image)
        assert all(160 <= side <= 240 for side in upright.size), path.name
    assert orientations - {1}, "some JPEGs must carry a rotating EXIF orientation"


def test_one_consistent_detectable_identity(cfg: PipelineConfig, tmp_path: Path) -> None:
    head = draw_face(SUBJECT, 100)
    assert (head.mode, head.size) == ("RGBA", (200, 200))
    assert head.getpixel((100, 100))[:3] != (0, 0, 0) and head.getpixel((0, 0))[3] == 0
    found = [
        detect_faces(ImageOps.exif_transpose(Image.open(p))) for p in sample_subject.run(cfg, tmp_path / "s")
    ]
    assert sum(bool(f) for f in found) >= NUM - 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_encode_orientation_round_trips(orientation: int) -> None:
    upright = Image.new("RGB", (4, 2))
    upright.putpixel((0, 0), (255, 0, 0))
    stored = encode_orientation(upright, orientation)
    stored.getexif()[EXIF_ORIENTATION_TAG] = orientation
    assert list(ImageOps.exif_transpose(stored).getdata()) == list(upright.getdata())


def test_photos_taken_in_a_scene_are_captioned_with_it(cfg: PipelineConfig, tmp_path: Path) -> None:
    """Photo i shows SCENE_CYCLE[i % 5]; a scene photo's caption is the instance prompt naming that scene, a plain
    background's photo has none (it trains with the instance prompt)."""
    cfg.data.instance_prompt = "a photo of zwx man face"
    photos = sample_subject.run(cfg, tmp_path / "subject")
    for i, photo in enumerate(photos):
        scene = sample_subject.SCENE_CYCLE[i % len(sample_subject.SCENE_CYCLE)]
        caption = photo.with_suffix(".txt")
        if scene == "plain":
            assert not caption.exists(), photo.name
        else:
            assert caption.read_text() == f"a photo of zwx man face in a {scene}\n", photo.name
    assert sum(p.with_suffix(".txt").exists() for p in photos) == 3  # photos 2, 3, 4 of 6
    cfg.sample_subject.captions = False
    sample_subject.run(cfg, tmp_path / "bare")
    assert len(list((tmp_path / "bare").iterdir())) == NUM  # photos only


def test_passes_through_prep(cfg: PipelineConfig, tmp_path: Path) -> None:
    """Every photo is accepted, faces found, and each scene caption lands in the manifest beside its crop."""
    photos = sample_subject.run(cfg, tmp_path / "subject")
    metrics = prep.run(cfg, tmp_path / "subject", tmp_path / "prepared", tmp_path / "reports")
    assert metrics["num_accepted"] == NUM and metrics["num_rejected"] == 0
    assert metrics["num_face"] >= NUM - 1
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    captions = {Path(e["source"]).name: e["caption"] for e in manifest["images"]}
    assert captions == {
        p.name: (p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else "")
        for p in photos
    }
    assert sorted(c for c in captions.values() if c) == [
        "a photo of sks man face in a forest",
        "a photo of sks man face in a kitchen",
        "a photo of sks man face in a night city",
    ]


@pytest.mark.parametrize(
    ("key", "value"), [("num_images", 0), ("min_size", 32), ("max_size", 100)], ids=["count", "min", "max"]
)
def test_bad_config_names_the_key(cfg: PipelineConfig, tmp_path: Path, key: str, value: int) -> None:
    setattr(cfg.sample_subject, key, value)
    with pytest.raises(ConfigError, match=f"sample_subject.{key}"):
        sample_subject.run(cfg, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cli(cfg: PipelineConfig, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    save_params(cfg, params)
    assert sample_subject.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("subject_*.[jp][pn]g"))) == NUM


@pytest.mark.parametrize("profile", ["tiny", "sd15", "seed_hw4"])
def test_every_profile_gets_the_sample_subject_through_prep(tmp_path: Path, profile: str) -> None:
    """Drawn at the profile's resolution: prep keeps every photo at that profile's crop size."""
    params = compose(
        tmp_path / "params.yaml", [f"profile={profile}", "sample_subject.num_images=6"], root=PROJECT_ROOT
    )
    cfg = load_config(params)
    photos = sample_subject.run(cfg, tmp_path / "subject")
    assert all(
        min(Image.open(p).size) >= min(cfg.prep.resolution, cfg.sample_subject.min_size) for p in photos
    )
    manifest = prep.run(cfg, tmp_path / "subject", tmp_path / "prepared", tmp_path / "reports")
    crops = sorted((tmp_path / "prepared").glob(f"*.{cfg.prep.image_format}"))
    assert len(crops) == 6, manifest
    assert {Image.open(c).size for c in crops} == {(cfg.prep.resolution, cfg.prep.resolution)}


def test_seed_profile_states_the_recipe_that_sd15_takes_from_the_defaults(tmp_path: Path) -> None:
    """``seed_hw4`` writes the reference recipe out value by value; ``sd15`` gets it from the schema defaults:
    both compose to the same parameters, so a changed default cannot silently change the recipe."""
    sd15 = yaml.safe_load(compose(tmp_path / "a.yaml", ["profile=sd15"], root=PROJECT_ROOT).read_text())
    seed = yaml.safe_load(compose(tmp_path / "b.yaml", ["profile=seed_hw4"], root=PROJECT_ROOT).read_text())
    assert sd15 == seed
