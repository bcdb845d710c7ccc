"""Read the composed configuration (params.yaml) into the typed dataclasses of :mod:`stages.lib.config.schema`."""

from __future__ import annotations

import difflib
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from stages.lib.config.checks import check_config
from stages.lib.config.schema import SECTIONS, PipelineConfig
from stages.lib.errors import ConfigError

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."


def _check_keys(section: str, cls: type, data: Any, source: str) -> None:
    """Reject unknown keys recursively with a close-match suggestion."""
    if not isinstance(data, dict):
        return
    known = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'.{_suggest(key, list(known))}")
        sub = known[key].default_factory if callable(known[key].default_factory) else None  # type: ignore[arg-type]
        if sub is not None and is_dataclass(sub):
            _check_keys(f"{section}.{key}", sub, value, source)


def build_section(section: str, data: dict[str, Any] | None, source: str = "params.yaml") -> Any:
    """Validate one section's plain data and return its dataclass instance."""
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section '{section}'.{_suggest(section, list(SECTIONS))}")
    cls = SECTIONS[section]
    data = data or {}
    _check_keys(section, cls, data, source)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:  # pragma: no cover - _check_keys catches these first
        raise ConfigError(f"{source}: {err}") from err
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{source}: invalid value for '{section}.{key}': {err.msg}") from err  # type: ignore[attr-defined]


def read_params(params_path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Load params.yaml as plain data, with a clear error when it is missing or malformed."""
    path = Path(params_path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: not found. Compose it from conf/ with `dvc exp run` or `python -m stages.compose`."
        )
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # yaml errors come in several types
        raise ConfigError(f"{path}: cannot be parsed as YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level.")
    return data


def load_config(params_path: str | Path = DEFAULT_PARAMS) -> PipelineConfig:
    """The whole pipeline configuration, validated section by section."""
    return checked_config(read_params(params_path), str(params_path))


def checked_config(data: dict[str, Any], source: str) -> PipelineConfig:
    """``data`` (params.yaml's content, or a composition of conf/) as the typed configuration, every key, type
    and value checked; a problem is a one-line ``ConfigError`` naming ``source`` and the full key."""
    _check_keys("", PipelineConfig, {k: None for k in data}, source)
    sections = {name: build_section(name, data.get(name), source) for name in SECTIONS}
    cfg = PipelineConfig(**sections)
    check_config(cfg, source)
    return cfg


def to_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a dataclass (or mapping) into ``{"a.b.c": value}`` for experiment trackers."""
    data = asdict(obj) if is_dataclass(obj) else obj
    flat: dict[str, Any] = {}
    for key, value in data.items():  # type: ignore[union-attr]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(to_flat_dict(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def save_params(cfg: PipelineConfig, path: str | Path) -> Path:
    """Write ``cfg`` as a params.yaml that :func:`load_config` reads back to an equal configuration (training
    sections written out whole)."""
    path = Path(path)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(asdict(cfg))))
    return path
