"""A stage's MLflow run in a child process, so that the stage never waits for MLflow.

Importing MLflow and opening its SQLite store takes 2-3.5 s of Python per stage process (README, Cost). The
sidecar pays it in a child that ``python -m stages <stage>`` starts before the stage's own imports (:func:`prestart`),
on the core those imports leave idle, and takes the run's calls over a pipe in order (a stage started otherwise
starts its child with its run, without the overlap). ``end`` waits until the child has written everything and ended the
run, so a stage (and ``dvc repro``) still finishes with its MLflow run complete. If the stage process dies, the
child reads the end of the pipe and ends the run as KILLED.

Run as ``python -m stages.lib.tracking.sidecar``: it reads pickled calls from stdin (written by
:class:`SidecarRun` in the stage's process, nobody else) and writes the :class:`RunResult` to stdout.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from typing import Any, BinaryIO

from stages.lib.config.schema import TrackingConfig
from stages.lib.tracking.mlflow_run import MetricRow, MlflowRun, RunResult


class SidecarRun:
    """The stage-side end: the same calls as :class:`MlflowRun`, sent to the child instead of made here.

    The child starts importing MLflow at once; ``bind`` names the stage and its config (the run starts with
    ``start``). Started by :func:`prestart` before a stage's own imports, the import overlaps them.
    """

    def __init__(self) -> None:
        self.stage = ""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._broken: str | None = None
        # A thread writes to the pipe, so that a call never blocks while the child is still importing MLflow.
        self._writer = threading.Thread(target=self._write_all, name="tracking-sidecar", daemon=True)
        self._writer.start()

    def bind(self, stage: str, cfg: TrackingConfig) -> SidecarRun:
        """Name the stage and its tracking config: the first message the child reads."""
        self.stage = stage
        self._send((stage, cfg))
        return self

    def start(self, params: dict[str, Any]) -> None:
        self._call("start", params)

    def log_metrics(self, rows: list[MetricRow]) -> None:
        self._call("log_metrics", rows)

    def log_image(self, image: Any, artifact_file: str) -> None:
        self._call("log_image", image, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path)

    def end(self, status: str) -> RunResult:
        """Send the last call, wait for the child to end the run, and return what it reports."""
        self._call("end", status)
        self.close()
        assert self._proc.stdout is not None
        with self._proc.stdout as results:
            try:
                result = pickle.load(results)
            except (pickle.UnpicklingError, EOFError, ValueError):
                why = self._broken or f"exit status {self._proc.wait()}"
                msg = f"MLflow tracking failed for stage '{self.stage}': its process ended ({why})"
                result = RunResult(errors=[msg])
        self._proc.wait()  # the child exits as soon as it has written the result
        return result

    def close(self) -> None:
        """Close the pipe once everything queued is written: a bound child ends its run as KILLED."""
        self._outbox.put(None)
        self._writer.join()

    def discard(self) -> None:
        """Stop a child that was never bound (it has no run)."""
        self.close()
        self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def _call(self, method: str, *args: Any) -> None:
        self._send((method, args))

    def _send(self, message: object) -> None:
        # Pickled here, not in the writer thread: the caller may change its objects after the call returns.
        self._outbox.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _write_all(self) -> None:
        pipe = self._proc.stdin
        assert pipe is not None
        while (data := self._outbox.get()) is not None:
            if self._broken is None:
                try:
                    pipe.write(data)
                    pipe.flush()
                except OSError as err:  # the child died: keep draining, end() reports it
                    self._broken = str(err)
        try:
            pipe.close()
        except OSError:
            pass


def serve(calls: BinaryIO, results: BinaryIO) -> None:
    """The child's loop: make each call on one MlflowRun until ``end`` (or the pipe's end: KILLED)."""
    try:
        stage, cfg = pickle.load(calls)
    except EOFError:  # never bound: the stage did not track (tracking disabled, or not the main process)
        return
    run = MlflowRun(stage, cfg)
    while True:
        try:
            method, args = pickle.load(calls)
        except EOFError:  # the stage process is gone without ending its run
            result = run.end("KILLED")
            break
        if method == "end":
            result = run.end(*args)
            break
        getattr(run, method)(*args)
    pickle.dump(result, results)
    results.flush()


def main() -> None:
    # Ctrl-C reaches the whole process group: the stage ends the run (FAILED); the child must live to write it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # anything MLflow prints goes to stderr, not into the result
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # What a run's start needs, imported while the stage imports torch: MLflow and its SQLite store's module.
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    serve(sys.stdin.buffer, results)
    # The run is ended and its result written: skip the ~1 s of MLflow's exit hooks and module teardown that the
    # stage would otherwise wait for.
    sys.stderr.flush()
    os._exit(0)


_prestarted: list[SidecarRun] = []


def prestart() -> None:
    """Start this process's sidecar now, before the stage's own imports (``python -m stages <stage>``)."""
    if not _prestarted:
        _prestarted.append(SidecarRun())


def take_prestarted() -> SidecarRun | None:
    """The sidecar :func:`prestart` started, if any (once)."""
    return _prestarted.pop() if _prestarted else None


def discard_prestarted() -> None:
    """Close a prestarted sidecar that no run took (the stage failed before tracking, or does not track)."""
    if (sidecar := take_prestarted()) is not None:
        sidecar.discard()


if __name__ == "__main__":
    main()
