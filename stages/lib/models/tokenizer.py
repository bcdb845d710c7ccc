"""A real CLIP BPE tokenizer built offline from the vocabulary file that ships inside open_clip's wheel."""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: bytes, bytes+</w>, merges, BOS/EOS
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bpe_vocab_path() -> Path:
    """Locate open_clip's BPE merges file without importing open_clip (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open_clip is not installed; it carries the CLIP BPE vocabulary. "
            "Install it with `pip install --no-deps open_clip_torch` (see Makefile)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP BPE vocabulary missing from the open_clip package")
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of CLIP ViT-L/14 (SD1.x) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(folder)
    return folder


def build_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write the tokenizer files into ``folder`` and load them back as SD1.x's CLIPTokenizer."""
    write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"{folder}: tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer
