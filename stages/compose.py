"""Compose conf/ into params.yaml exactly as DVC's Hydra integration does (`make params`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dvc.utils.hydra import compose_and_dump


def compose(output: Path, overrides: list[str], root: Path = Path(".")) -> Path:
    """Write the composition of ``root/conf`` with ``overrides`` to ``output``."""
    root = root.resolve()
    compose_and_dump(output, str(root / "conf"), None, "config", str(root), overrides)
    return output


def one_line(err: BaseException) -> str:
    """A composition error's message on one line, without OmegaConf's wrapper prefix (the project's ConfigError
    already names the key and what to do)."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines()) or type(err).__name__
    return text.split("raised while resolving interpolation: ", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. lora.rank=8 profile=seed_hw4")
    parser.add_argument("--out", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        compose(args.out, args.overrides)
    except Exception as err:  # Hydra/OmegaConf wrap the project's ConfigError; one line names key and fix
        raise SystemExit(f"error: {one_line(err)}") from None
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
