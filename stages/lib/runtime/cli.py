"""The command-line frame every stage shares: argument parsing, config loading, clear errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from stages.lib.config.loader import load_config
from stages.lib.config.schema import ComputeConfig, PipelineConfig
from stages.lib.errors import ConfigError, StageError
from stages.lib.runtime.distributed import relaunch
from stages.lib.tracking.sidecar import discard_prestarted


def configure_threads(cfg: ComputeConfig) -> None:
    """Apply compute.num_threads (0 keeps torch's default); torch is imported only when needed."""
    if cfg.num_threads > 0:
        import torch

        torch.set_num_threads(cfg.num_threads)


def stage_main(
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[PipelineConfig, argparse.Namespace], object],
    argv: Sequence[str] | None = None,
    launch_module: str | None = None,
) -> int:
    """Parse ``--params`` plus the stage's own path arguments, load the config and run the stage.

    Known failures (bad config, bad input) print one clear line and exit with status 2. Stages that can spread
    over several processes pass ``launch_module``: with ``compute.num_processes`` > 1 they re-run under
    ``accelerate launch``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="composed config (default: params.yaml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.params)
        configure_threads(cfg.compute)
        if launch_module is not None:
            status = relaunch(cfg.compute, launch_module, list(sys.argv[1:] if argv is None else argv))
            if status is not None:
                return status
        run(cfg, args)
    except (ConfigError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        discard_prestarted()
    return 0
