"""The miniature world: deterministic captioned renders, the colour-preserving tiny VAE, the attribute reader and
the world metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.lib.config.schema import TinyModelConfig
from stages.lib.imaging.images import to_pixels
from stages.lib.miniature import world_metrics as wm
from stages.lib.miniature.attribute_reader import (
    ReaderTraining,
    label_tensors,
    load_reader,
    save_reader,
    train_reader,
)
from stages.lib.miniature.tiny_model import tiny_vae
from stages.lib.miniature.tiny_vae import PIXEL_MEAN
from stages.lib.miniature.world import (
    ATTRIBUTES,
    SUBJECT_IDENTITY,
    Identity,
    WorldImage,
    caption,
    describe,
    render,
    render_world,
)


def test_world_is_deterministic_and_never_shows_the_subject() -> None:
    a = render_world(3, range(40), 64)
    b = render_world(3, range(40), 64)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b, strict=True))
    assert [i.caption for _, i in a] == [i.caption for _, i in b]
    items = [describe(0, i) for i in range(3000)]
    assert all(item.identity != SUBJECT_IDENTITY for item in items)
    for name, classes in ATTRIBUTES.items():  # every class of every attribute appears
        assert {item.labels()[name] for item in items} == set(range(len(classes))), name
    dropped = sum(item.caption == "" for item in items) / len(items)
    assert 0.05 < dropped < 0.15


def test_captions_use_the_seed_vocabulary() -> None:
    rng = np.random.default_rng(0)
    person = Identity("dark", "black", "long", "beard", "glasses")
    assert caption(person, "forest", "photo", rng).startswith("a photo of man face")
    assert caption(person, "forest", "photo", rng).endswith(" in a forest")
    assert caption(person, "plain", "anime", rng, token="sks").startswith(
        "anime style portrait of sks man face"
    )
    assert caption(person, "night city", "classicist", rng).startswith("classicist art painting of man face")
    texts = {caption(person, "kitchen", "photo", np.random.default_rng(s)) for s in range(40)}
    assert any("black long hair" in t for t in texts) and any("glasses" in t for t in texts)


def test_prompt_parsing_matches_the_infer_prompts() -> None:
    assert wm.expected_scene("a photo of sks man face in a night city") == "night city"
    assert wm.expected_scene("anime style portrait of sks man face") == "plain"
    assert wm.expected_style("classicist art painting of sks man face") == "classicist"
    assert wm.expected_style("a photo of sks man face in a kitchen") == "photo"


def test_tiny_vae_keeps_colour_and_layout() -> None:
    """decode(encode(x)) is the 4x4-average thumbnail of x, smoothly enlarged, in the original colours."""
    vae = tiny_vae(TinyModelConfig())
    images = [image for image, _ in render_world(1, range(24), 64)]
    x = to_pixels(images, 64)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist
        pooled = torch.nn.functional.avg_pool2d(x, 4)
        mean = torch.tensor(PIXEL_MEAN[:3])[None, :, None, None]
        assert torch.allclose(latents.mean[:, :3] / 11.0 + mean, pooled, atol=2e-3)
        assert float(latents.std.max()) < 0.01  # sampling the posterior barely moves the latents
        scaled = latents.mean * vae.config.scaling_factor
        assert (
            abs(float(scaled.mean())) < 0.5 and 0.5 < float(scaled.std()) < 1.5
        )  # near SD latent statistics
        decoded = vae.decode(latents.mean).sample
    enlarged = torch.nn.functional.interpolate(pooled, scale_factor=4, mode="bilinear")
    inner = (decoded - enlarged)[..., 8:-8, 8:-8].abs().mean()
    assert float(inner) < 0.03
    assert float((decoded - x).abs().mean()) < 0.2  # a blurred copy, not noise


@pytest.fixture(scope="module")
def reader_and_data():
    rendered = render_world(5, range(700), 64)
    pixels = to_pixels([im for im, _ in rendered], 64)
    labels = label_tensors([item for _, item in rendered])
    reader, acc = train_reader(pixels, labels, ReaderTraining(steps=300, batch_size=64), holdout=150)
    return reader, acc, rendered


def test_attribute_reader_reads_held_out_world_images(reader_and_data) -> None:
    _, acc, _ = reader_and_data
    chance = {n: 1 / len(c) for n, c in ATTRIBUTES.items()}
    assert acc["scene"] > 0.9 and acc["style"] > 0.9, acc
    assert all(acc[n] > chance[n] + 0.2 for n in ("skin", "hair_colour", "beard")), acc


def test_world_metrics_on_reader_output(reader_and_data, tmp_path) -> None:
    reader, _, _ = reader_and_data
    save_reader(reader, tmp_path / "r", {"subject": dict(SUBJECT_IDENTITY.__dict__)})
    loaded, info = load_reader(tmp_path / "r")
    rng = np.random.default_rng(0)
    subject = [render(WorldImage(SUBJECT_IDENTITY, "forest", "photo", ""), 64, rng) for _ in range(12)]
    others = [im for im, _ in render_world(9, range(12), 64)]
    sub, oth = loaded.read(subject), loaded.read(others)
    assert wm.subject_scores(sub, info["subject"])["subject_match"] > 0.7
    assert wm.subject_scores(oth, info["subject"])["subject_match"] < 0.6
    assert wm.diversity(sub) < wm.diversity(oth)
    assert wm.fidelity_scores({"a photo of sks man face in a forest": sub})["scene_fidelity"] > 0.9
    assert load_reader(tmp_path / "missing") is None


def test_reference_row_reads_the_photos_through_the_vae(reader_and_data) -> None:
    """compare's `prepared_photos` row: the subject's photos, decoded from the base VAE's latents, read as the
    subject; another person's photos, through the same VAE, do not."""
    from stages.compare import reference_scores
    from stages.lib.metrics.image_metrics import encode_references

    reader, _, _ = reader_and_data
    vae = tiny_vae(TinyModelConfig())
    rng = np.random.default_rng(3)
    subject = [render(WorldImage(SUBJECT_IDENTITY, "plain", "photo", ""), 64, rng) for _ in range(8)]
    others = [im for im, _ in render_world(13, range(8), 64)]
    identity = dict(SUBJECT_IDENTITY.__dict__)
    with torch.no_grad():
        sub, oth = (
            reference_scores(reader, identity, vae, encode_references(vae, ims, 64, 64))
            for ims in (subject, others)
        )
    assert set(sub) == {"subject_rate", "subject_rate_stderr", "subject_match"}
    assert sub["subject_match"] > oth["subject_match"] + 0.2, (sub, oth)


def test_world_metric_arithmetic() -> None:
    a = {
        "skin": "tan",
        "hair_colour": "ginger",
        "hair_style": "curly",
        "beard": "beard",
        "glasses": "glasses",
    }
    b = {**a, "glasses": "no glasses"}
    assert wm.subject_scores([a, b], a) == {
        "subject_rate": 0.5,
        "subject_rate_stderr": pytest.approx(0.5 / 2**0.5),
        "subject_match": 0.9,
    }
    assert wm.subject_scores([a] * 4, a)["subject_rate_stderr"] == 0.0
    assert wm.diversity([a, a]) == 0.0 and wm.diversity([a, b]) == pytest.approx(0.2)
    assert wm.class_scores([a, b], a) == {
        "class_diversity": pytest.approx(0.2),
        "class_subject_rate": 0.5,
        "class_subject_match": 0.9,
    }


def test_compare_reads_subject_and_drift_off_infer_outputs(reader_and_data, tmp_path) -> None:
    """compare.world_scores on an infer index: subject images score as the subject, world images do not."""
    from stages.compare import world_scores
    from stages.lib.imaging.images import save_image
    from stages.lib.sampling.inference import InferIndex

    reader, _, _ = reader_and_data
    rng = np.random.default_rng(1)
    prompt = "a photo of sks man face in a forest"
    images = {
        "dreambooth": [
            render(WorldImage(SUBJECT_IDENTITY, "forest", "photo", ""), 64, rng) for _ in range(6)
        ],
        "base": [im for im, _ in render_world(11, range(6), 64)],
    }
    variants, class_images = {}, {}
    for name, ims in images.items():
        files = [save_image(im, tmp_path / name / "p" / f"{i:02d}.png") for i, im in enumerate(ims)]
        variants[name] = {prompt: [f.relative_to(tmp_path).as_posix() for f in files]}
        class_images[name] = variants[name][prompt]  # as if the class prompt drifted to these images
    index = InferIndex(
        tmp_path, [prompt], variants, {}, {}, class_prompt="a photo of man face", class_images=class_images
    )
    subject = dict(SUBJECT_IDENTITY.__dict__)
    db, base = (world_scores(reader, subject, index, v, "sks") for v in ("dreambooth", "base"))
    assert db["subject_match"] > base["subject_match"] + 0.3, (db, base)
    assert (
        db["class_subject_rate"] >= base["class_subject_rate"]
        and db["class_subject_match"] > base["class_subject_match"]
        and db["class_diversity"] < base["class_diversity"]
    )
    assert set(db) == {
        "subject_rate",
        "subject_rate_stderr",
        "subject_match",
        "scene_fidelity",
        "style_fidelity",
        "class_diversity",
        "class_subject_rate",
        "class_subject_match",
    }
