"""``python -m stages <stage> [args]``: run one stage with its MLflow sidecar started first (dvc.yaml's commands).

``python -m stages.<stage>`` runs the same stage, but this way MLflow's import (2-3.5 s) runs in the sidecar while
the stage imports torch and diffusers, instead of after them (stages/lib/tracking_sidecar.py).
"""

from __future__ import annotations

import gc
import importlib
import sys

TRACKED_STAGES = (
    "base",
    "prep",
    "class_images",
    "dreambooth",
    "lora",
    "convert",
    "infer",
    "compare",
    "controlnet_train",
    "controlnet",
)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TRACKED_STAGES:
        given = f"'{argv[0]}'" if argv else "no stage"
        print(f"error: {given}: python -m stages takes one of {', '.join(TRACKED_STAGES)}", file=sys.stderr)
        return 2
    from stages.lib.tracking_sidecar import prestart

    prestart()
    stage = importlib.import_module(f"stages.{argv[0]}")
    return stage.main(argv[1:])


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # The stage is done and has closed its files. The interpreter's last garbage collection would now walk the whole
    # torch / diffusers / transformers object graph, ~1.2 s per stage process; it skips frozen objects (atexit
    # handlers still run). Only here, in the process's entry point: frozen objects are never collected.
    gc.freeze()
    raise SystemExit(status)
