"""What the attribute reader makes measurable on the miniature world: subject identity, prompt fidelity, diversity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

from stages.lib.miniature.world import IDENTITY_ATTRIBUTES, SCENE_SUFFIX, STYLE_PREFIX

Reading = dict[str, str]

DESCRIPTIONS = {
    "subject_rate": "share of images whose identity (skin, hair colour and style, beard, glasses) is the subject's",
    "subject_rate_stderr": "binomial standard error of subject_rate over its images: smaller differences are noise",
    "subject_match": "mean share of the subject's identity attributes present",
    "scene_fidelity": "share of images showing the scene their prompt names (no scene word: plain)",
    "style_fidelity": "share of images in the style their prompt names (photo, anime, classicist)",
    "class_diversity": "mean share of identity attributes that differ between two class-prompt images",
    "class_subject_rate": "share of class-prompt images that show the subject (language drift)",
    "class_subject_match": "mean share of the subject's identity attributes in class-prompt images (partial drift)",
}


def expected_scene(prompt: str) -> str:
    """The scene a prompt asks for; "plain" when it names none."""
    text = prompt.lower()
    return next(
        (scene for scene, suffix in SCENE_SUFFIX.items() if suffix and suffix.strip() in text), "plain"
    )


def expected_style(prompt: str) -> str:
    """The style a prompt asks for, from its wording; "photo" unless it names anime or classicist art."""
    text = prompt.lower()
    return next(
        (s for s, prefix in STYLE_PREFIX.items() if s != "photo" and prefix.split()[0] in text), "photo"
    )


def identity(reading: Reading) -> tuple[str, ...]:
    return tuple(reading[a] for a in IDENTITY_ATTRIBUTES)


def subject_scores(readings: Sequence[Reading], subject: Reading) -> dict[str, float]:
    """subject_rate (with its binomial standard error) and subject_match of ``readings`` against the subject's
    identity."""
    target = identity(subject)
    matches = [sum(a == b for a, b in zip(identity(r), target, strict=True)) for r in readings]
    n = max(len(readings), 1)
    rate = sum(m == len(target) for m in matches) / n
    return {
        "subject_rate": rate,
        "subject_rate_stderr": math.sqrt(rate * (1 - rate) / n),
        "subject_match": sum(matches) / (n * len(target)),
    }


def fidelity_scores(readings_by_prompt: dict[str, Sequence[Reading]]) -> dict[str, float]:
    """scene_fidelity and style_fidelity over every prompt's images."""
    scene = style = total = 0
    for prompt, readings in readings_by_prompt.items():
        scene += sum(r["scene"] == expected_scene(prompt) for r in readings)
        style += sum(r["style"] == expected_style(prompt) for r in readings)
        total += len(readings)
    total = max(total, 1)
    return {"scene_fidelity": scene / total, "style_fidelity": style / total}


def diversity(readings: Sequence[Reading]) -> float:
    """Mean over image pairs of the share of identity attributes that differ (0: all the same person)."""
    pairs = list(combinations([identity(r) for r in readings], 2))
    if not pairs:
        return 0.0
    differ = sum(sum(x != y for x, y in zip(a, b, strict=True)) for a, b in pairs)
    return differ / (len(pairs) * len(IDENTITY_ATTRIBUTES))


def class_scores(readings: Sequence[Reading], subject: Reading) -> dict[str, float]:
    """class_diversity, class_subject_rate and class_subject_match of images made from the class prompt."""
    drift = subject_scores(readings, subject)
    return {
        "class_diversity": diversity(readings),
        "class_subject_rate": drift["subject_rate"],
        "class_subject_match": drift["subject_match"],
    }
