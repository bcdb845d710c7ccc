"""dreambooth's output folder: the trained weights in fp32, the frozen components exactly the base's (training on
CUDA holds them in bf16; diffusers' train_dreambooth.py reloads them from the base when it saves)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.dreambooth import save_finetuned
from stages.lib.models.loading import load_pipeline

from .conftest import untrained_base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_base(tmp_path_factory.mktemp("db-save"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _trained(base_dir: Path, train_text_encoder: bool):
    """The base pipeline as CUDA training leaves it: frozen modules in bf16, the trained ones changed, fp32."""
    pipe = load_pipeline(base_dir)
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(0.5)
        if train_text_encoder:
            next(pipe.text_encoder.parameters()).add_(0.5)
    frozen = [pipe.vae] + ([] if train_text_encoder else [pipe.text_encoder])
    for module in frozen:
        module.to(torch.bfloat16)
    return pipe


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_frozen_components_are_the_bases_bytes(
    base_dir: Path, tmp_path: Path, train_text_encoder: bool
) -> None:
    out = tmp_path / "dreambooth"
    save_finetuned(
        _trained(base_dir, train_text_encoder), base_dir, out, trained_text_encoder=train_text_encoder
    )
    assert _files(out / "vae") == _files(base_dir / "vae"), "the VAE is the base's, not a bf16 round trip"
    same_text_encoder = _files(out / "text_encoder") == _files(base_dir / "text_encoder")
    assert same_text_encoder is not train_text_encoder
    saved, base = load_pipeline(out), load_pipeline(base_dir)
    assert saved.unet.dtype == torch.float32
    unet_delta = next(saved.unet.parameters()) - next(base.unet.parameters())
    assert torch.allclose(unet_delta, torch.full_like(unet_delta, 0.5)), "the trained UNet, in fp32"
    if train_text_encoder:
        te_delta = next(saved.text_encoder.parameters()) - next(base.text_encoder.parameters())
        assert torch.allclose(te_delta, torch.full_like(te_delta, 0.5))
