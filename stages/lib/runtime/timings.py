"""Where a stage's wall time goes: named phases, timed from the start of the process.

Code marks its phases with ``with phase("load"):``; phases nest, and each counts only its own time (a validation
inside training is not counted twice). At the end :func:`report` gives ``startup`` (interpreter start to the first
phase: imports and config), each phase, ``other`` (the rest) and ``total``; :func:`stage_main` logs it as one line
and, when ``SDPIPE_TIMINGS`` names a file, writes it there as JSON (``benchmarks/recipe.py`` adds the stages up).
A phase ends after the GPU has finished its work (``torch.cuda.synchronize`` where CUDA is in use), so GPU time is
counted in the phase that queued it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

TIMINGS_ENV = "SDPIPE_TIMINGS"
PROFILE_ENV = "SDPIPE_PROFILE"


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0, i.e. from this module's import)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _sync_gpu() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StageClock:
    """Exclusive wall time per named phase since ``start`` (a ``time.perf_counter`` value)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first_phase: float | None = None
        self.seconds: dict[str, float] = {}
        self._children: list[float] = []  # per open phase: time spent in its nested phases

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (accumulated over calls), less the phases nested in it."""
        entered = time.perf_counter()
        if self.first_phase is None:
            self.first_phase = entered
        self._children.append(0.0)
        try:
            yield
        finally:
            _sync_gpu()
            elapsed = time.perf_counter() - entered
            nested = self._children.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
            if self._children:
                self._children[-1] += elapsed

    def report(self) -> dict[str, float]:
        """``startup``, every phase, ``other`` and ``total``, in seconds."""
        now = time.perf_counter()
        startup = (self.first_phase if self.first_phase is not None else now) - self.start
        total = now - self.start
        out = {"startup": startup, **self.seconds}
        out["other"] = max(0.0, total - sum(out.values()))
        out["total"] = total
        return out


CLOCK = StageClock(time.perf_counter() - _process_age())


def phase(name: str) -> AbstractContextManager[None]:
    """``with phase("save"): ...``: time the block in this process's clock."""
    return CLOCK.phase(name)


def summary_line(report: dict[str, float]) -> str:
    """``total 41.2 s: startup 6.1, load 2.3, ...`` (phases above 0.05 s, largest first)."""
    parts = sorted(((k, v) for k, v in report.items() if k != "total" and v >= 0.05), key=lambda kv: -kv[1])
    return f"total {report['total']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in parts)


def write_report(report: dict[str, float], env: dict[str, str] | None = None) -> Path | None:
    """Write ``report`` as JSON to the file ``SDPIPE_TIMINGS`` names, if it names one."""
    target = (os.environ if env is None else env).get(TIMINGS_ENV)
    if not target:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: round(v, 3) for k, v in report.items()}, indent=1) + "\n")
    return path


@contextmanager
def host_profile(env: dict[str, str] | None = None) -> Iterator[Path | None]:
    """Run the block under ``cProfile`` and write its stats (``pstats`` format) to the file ``SDPIPE_PROFILE``
    names, if it names one: where the host's time goes (on a GPU, time the host waits shows as the waiting call)."""
    target = (os.environ if env is None else env).get(PROFILE_ENV)
    if not target:
        yield None
        return
    import cProfile

    path = Path(target)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield path
    finally:
        profiler.disable()
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(path))
