"""The sampling batch-size setting: ``auto`` or a positive integer.

Kept free of torch so that the config schema can check the value when it is read (DVC's Hydra composition imports
the schema in its own process). OmegaConf structured configs have no union types, so the config fields are strings
(``-S infer.batch_size=16`` arrives as ``"16"``); code may also pass an int.
"""

from __future__ import annotations

from stages.lib.errors import ConfigError

AUTO = "auto"


def parse_batch_size(value: int | str, key: str) -> int | str:
    """``AUTO`` or a positive int; anything else is a one-line ``ConfigError`` naming ``key`` (the full key)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit() and int(text) > 0:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ConfigError(f"{key}={value!r}: use {AUTO} or a positive integer")
