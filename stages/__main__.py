"""``python -m stages <stage> [args]``: run one stage with its MLflow sidecar started first (dvc.yaml's commands).

``python -m stages.<stage>`` runs the same stage, but this way MLflow's import (2-3.5 s) runs in the sidecar while
the stage imports torch and diffusers, instead of after them (stages/lib/tracking/sidecar.py). A stage that can
spread over several processes is launched under ``accelerate launch`` from here when ``compute.num_processes`` > 1,
before its own imports: this process only waits for the launch, and each launched process runs ``python -m stages``
again (the main one with its sidecar).
"""

from __future__ import annotations

import argparse
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
LAUNCHABLE_STAGES = frozenset({"class_images", "dreambooth", "lora", "controlnet_train"})


def launch_early(stage: str, argv: list[str]) -> int | None:
    """The exit status of ``stage`` launched on ``compute.num_processes`` processes (of the ``--params`` file in
    ``argv``), or None when this process should run it itself."""
    from stages.lib.config.loader import load_config
    from stages.lib.errors import ConfigError
    from stages.lib.runtime.distributed import launched, relaunch

    if launched() or "-h" in argv or "--help" in argv:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml")
    try:
        cfg = load_config(parser.parse_known_args(argv)[0].params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return relaunch(cfg.compute, "stages", [stage, *argv])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TRACKED_STAGES:
        given = f"'{argv[0]}'" if argv else "no stage"
        print(f"error: {given}: python -m stages takes one of {', '.join(TRACKED_STAGES)}", file=sys.stderr)
        return 2
    from stages.lib.runtime.distributed import is_main_process
    from stages.lib.tracking.sidecar import discard_prestarted, prestart

    if is_main_process():  # the processes of a launch: only the main one logs
        prestart()
    if argv[0] in LAUNCHABLE_STAGES and (status := launch_early(argv[0], argv[1:])) is not None:
        discard_prestarted()  # the launched main process has its own
        return status
    stage = importlib.import_module(f"stages.{argv[0]}")
    return stage.main(argv[1:])


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # The stage is done and has closed its files. The interpreter's last garbage collection would now walk the whole
    # torch / diffusers / transformers object graph, ~1.2 s per stage process; it skips frozen objects (atexit
    # handlers still run). Only here, in the process's entry point: frozen objects are never collected.
    gc.freeze()
    raise SystemExit(status)
