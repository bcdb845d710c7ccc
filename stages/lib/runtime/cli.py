"""The command-line frame every stage shares: argument parsing, config loading, clear errors."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from stages.lib.config.loader import load_config
from stages.lib.config.schema import ComputeConfig, PipelineConfig
from stages.lib.errors import ConfigError, StageError
from stages.lib.runtime.distributed import is_main_process, relaunch
from stages.lib.runtime.quiet import install_for_stage
from stages.lib.runtime.timings import CLOCK, host_profile, phase, summary_line, write_report
from stages.lib.tracking.sidecar import discard_prestarted


def configure_threads(cfg: ComputeConfig) -> None:
    """Apply compute.num_threads (0 keeps torch's default); torch is imported only when needed."""
    if cfg.num_threads > 0:
        import torch

        torch.set_num_threads(cfg.num_threads)


# file-system refusals the user can fix; any other OSError is a bug and keeps its traceback
FS_REFUSALS = {
    errno.EACCES: "permission denied: give yourself access to {where} (chmod -R u+rwX {where}) or run as its owner",
    errno.EPERM: "operation not permitted: give yourself access to {where} (chmod -R u+rwX {where})",
    errno.EROFS: "read-only file system: put the project on a writable disk",
    errno.ENOSPC: "no space left on the device: free some space and run again",
}


def fs_refusal(err: OSError) -> str | None:
    """The one-line message for a file-system refusal (permission, read-only, disk full), or None."""
    if err.errno not in FS_REFUSALS:
        return None
    path = Path(os.fsdecode(err.filename)) if err.filename else None
    if path is None:
        return FS_REFUSALS[err.errno].format(where="the output folders")
    where = path if path.is_dir() else path.parent  # a new file or atomic_dir's .<name>.tmp: its folder
    return f"{path}: " + FS_REFUSALS[err.errno].format(where=where)


def restore_hint() -> str | None:
    """Under DVC (which sets DVC_STAGE), how to bring back the outputs DVC removed before running the stage."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return None
    return (
        f"note: DVC removed the previous outputs of '{stage}' before running it; "
        f"`dvc checkout {stage}` restores them from DVC's cache (those marked cache: false, such as metrics.json, "
        "only from git, if committed)"
    )


def report_failure(message: str) -> int:
    """Print the one-line error (and the restore hint under DVC) on stderr; the exit status for a known failure."""
    print(f"error: {message}", file=sys.stderr)
    hint = restore_hint()
    if hint:
        print(hint, file=sys.stderr)
    return 2


def report_timings() -> dict[str, float]:
    """Log where this process's wall time went (one line) and, from the main process of a launched stage, write
    it where ``SDPIPE_TIMINGS`` says."""
    report = CLOCK.report()
    logging.getLogger("stages").info("wall time %s", summary_line(report))
    if is_main_process():
        write_report(report)
    return report


def stage_main(
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[PipelineConfig, argparse.Namespace], object],
    argv: Sequence[str] | None = None,
    launch_module: str | None = None,
) -> int:
    """Parse ``--params`` plus the stage's own path arguments, load the config and run the stage.

    Known failures (bad config, bad input, a folder that cannot be written, a full disk) print one clear line
    (plus, under DVC, how to restore the outputs DVC removed) and exit with status 2. Stages that can spread
    over several processes pass ``launch_module``: with ``compute.num_processes`` > 1 they re-run under
    ``accelerate launch``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="composed config (default: params.yaml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_for_stage()
    try:
        with phase("config"):
            cfg = load_config(args.params)
        configure_threads(cfg.compute)
        if launch_module is not None:
            status = relaunch(cfg.compute, launch_module, list(sys.argv[1:] if argv is None else argv))
            if status is not None:
                return status
        with host_profile():
            run(cfg, args)
        report_timings()
    except (ConfigError, StageError) as err:
        return report_failure(str(err))
    except OSError as err:
        message = fs_refusal(err)
        if message is None:
            raise
        return report_failure(message)
    finally:
        discard_prestarted()
    return 0
