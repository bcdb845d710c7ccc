"""Several processes (GPUs, or CPU processes over gloo) through ``accelerate launch``.

A stage whose ``compute.num_processes`` is above 1 re-launches itself under ``accelerate launch``; inside the
launch every process runs the same stage code, shards the work by ``process_index`` and only the main process
logs, writes reports and saves outputs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from stages.lib.config.schema import ComputeConfig


def launched() -> bool:
    """True inside ``accelerate launch`` / ``torchrun`` (the launcher sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> tuple[int, int]:
    """(process index, number of processes) of this process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return world()[0] == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if launched():
        from accelerate import PartialState

        # on CPU the process group is gloo, which PartialState only sets up when told so
        PartialState(
            cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        ).wait_for_everyone()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(cfg: ComputeConfig, module: str, argv: Sequence[str]) -> list[str]:
    """``accelerate launch`` of ``python -m module argv`` on ``cfg.num_processes`` processes of this machine."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
    cmd += ["--num_processes", str(cfg.num_processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), "--module", module, *argv]
    return cmd


def relaunch(cfg: ComputeConfig, module: str, argv: Sequence[str]) -> int | None:
    """Re-run this stage under ``accelerate launch`` when more than one process is configured.

    Returns the launch's exit status, or None when this process should do the work itself. On CPU the processes
    talk over gloo (``accelerate launch --cpu`` would silently run a single process).
    """
    if cfg.num_processes <= 1 or launched():
        return None
    return subprocess.call(launch_command(cfg, module, argv), env=launch_env(cfg))


def launch_env(cfg: ComputeConfig) -> dict[str, str]:
    """This process's environment for ``accelerate launch``; on CPU it asks for gloo (``ACCELERATE_USE_CPU``)."""
    import torch

    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return {**os.environ, "ACCELERATE_USE_CPU": "true"} if use_cpu else dict(os.environ)
