"""The offline CLIP BPE tokenizer gives the real CLIP ids."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from stages.lib.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer


def test_known_ids_and_sd_padding(tmp_path: Path) -> None:
    tok = build_clip_tokenizer(tmp_path)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("a photo of sks man face").input_ids == [49406, 320, 1125, 539, 48136, 786, 1710, 49407]
    assert len(tok) == VOCAB_SIZE
    padded = tok("hello", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == MODEL_MAX_LENGTH and padded[-1] == 49407


def test_saved_files_reload_with_plain_transformers(tmp_path: Path) -> None:
    build_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == MODEL_MAX_LENGTH
    assert tok.decode(tok("night city").input_ids, skip_special_tokens=True).strip() == "night city"
