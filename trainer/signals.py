"""SIGINT / SIGTERM in a driver (trainer.run, trainer.evaluate, tune.search): stop at a safe point.

The first signal is remembered. While a pre-training stage's Ray Train run is in progress it also
asks that run's workers to stop: a marker file (`stop_requested`) in the run's storage folder,
which the epoch loop polls between steps (trainer/worker/stop.py). The workers then return an
"interrupted" outcome after their last report, so Ray registers that epoch's checkpoint and
`fit()` returns normally; `trainer.launch.run_train_stage` raises `interrupted(...)`. Anywhere else
(writing .beton files, an evaluation stage, between stages) nothing is lost but unfinished work a
rerun redoes, so the handler raises at once; so does a second signal, wherever it arrives. The
entry point (conf.cli.cli_main) prints the one line and exits with 128 + the signal number: 130
for SIGINT (Ctrl-C), 143 for SIGTERM (a scheduler's stop, `ray job stop`).

Ray installs its own handlers in the driver: `ray.init` a SIGTERM one (sys.exit), Ray Train's
`fit()` in the main thread a SIGINT one that aborts the run (killing the workers before their last
checkpoint is registered). The handlers are installed again after `ray.init` (`reinstall`), and
`run_train_stage` calls `fit()` from a helper thread (`run_stoppable`), where Ray Train installs
none. During a Tune sweep's `fit()` (tune.search, `trainer.run seeds=[...]`, the study) a first
signal is handed to a delegate (`delegated_to_tune`): trainer/trial_stop.py asks every running
trial's Train run to stop between steps the same way, then runs Tune's own graceful stop.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from conf import RunStopped
from trainer.storage import absolute_location, exists, storage_fs, write_text

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_FILE = "stop_requested"
RERUN = "rerun the same command to resume"


class _State:
    """This process's signal state (a driver handles its signals in its main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.count = 0
        self.stop_file: str | None = None  # the stop marker of the pre-training run in progress
        self.phase = "start-up"  # where the driver is, for the line of an immediate stop
        self.installed = False
        self.delegate: Callable[[int, Any], bool] | None = None  # a graceful stop someone else runs (Tune's)


_state = _State()


def install() -> None:
    """Handle SIGINT and SIGTERM from now on (an entry point calls it; main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, handle)
        _state.installed = True


def reinstall() -> None:
    """After `ray.init` (which installs its own SIGTERM handler): ours again, if an entry point installed them."""
    if _state.installed:
        install()


def reset() -> None:
    """Forget the signals received (a process that runs several drivers one after another: tests)."""
    global _state
    installed, _state = _state.installed, _State()
    _state.installed = installed


def received() -> int | None:
    """The first signal this driver received (None: none)."""
    return _state.signum


def exit_status(signum: int | None) -> int:
    return 128 + (signum or signal.SIGINT)


class Interrupted(RunStopped):
    """A stop asked for by a signal (or, in a Tune trial, by the sweep driver's stop marker); `epoch`:
    the last finished epoch of the Train run it stopped (None: it stopped outside one)."""

    def __init__(self, message: str, exit_status: int, epoch: int | None = None) -> None:
        super().__init__(message, exit_status)
        self.epoch = epoch


def interrupted(where: str, epoch: int | None = None) -> Interrupted:
    """The one line of a run stopped by a signal: `interrupted <where>; rerun the same command to resume`."""
    return Interrupted(f"interrupted {where}; {RERUN}", exit_status(_state.signum), epoch)


def handle(signum: int, frame: Any) -> None:
    """First signal inside a stoppable Train run: ask its workers to stop; otherwise stop here."""
    _state.count += 1
    if _state.signum is None:
        _state.signum = signum
    if _state.count == 1 and _state.delegate is not None and _state.delegate(signum, frame):
        return  # the delegate said what it does
    if _state.count == 1 and _state.stop_file:
        request_stop(_state.stop_file)
        print(f"[run] {signal.Signals(signum).name}: stopping after the current training step "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        return
    again = " (stopped at once: the unfinished epoch is lost)" if _state.stop_file else ""
    raise interrupted(f"during {_state.phase}{again}")


@contextmanager
def phase(label: str) -> Iterator[None]:
    """Name what the driver is doing, for the line of a signal that stops it there."""
    before, _state.phase = _state.phase, label
    try:
        yield
    finally:
        _state.phase = before


@contextmanager
def delegated_to_tune(delegate: Callable[[int, Any], bool]) -> Iterator[None]:
    """During `Tuner.fit()`: a first signal goes to `delegate(signum, frame)` (True: it stops the
    sweep at a safe point; False: stop here, at once). Tune's own SIGINT handler is turned off
    (TUNE_DISABLE_SIGINT_HANDLER), so that this module sees SIGINT and SIGTERM alike; Tune keeps its
    graceful stop on SIGUSR1 (`tune_graceful_stop`)."""
    import os

    env_before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    before, _state.delegate = _state.delegate, delegate
    try:
        yield
    finally:
        _state.delegate = before
        if env_before is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env_before


def tune_graceful_stop(signum: int = signal.SIGUSR1, frame: Any = None) -> bool:
    """Run Tune's own graceful stop (the handler `tune.run` keeps on SIGUSR1: it ends the loop, saves
    the experiment state, then ends the trial actors); False when Tune's loop is not running. Main thread."""
    handler = signal.getsignal(signal.SIGUSR1)
    if not callable(handler) or handler is handle:
        return False
    handler(signum, frame)
    return True


def stop_file(run_path: str) -> str:
    """The stop marker of the Train run stored at `run_path` (trainer.launch.trainer_path: a local path or a URI)."""
    return f"{absolute_location(run_path).rstrip('/')}/{STOP_FILE}"


def request_stop(uri: str) -> None:
    write_text(uri, "stop after the current step\n")


def clear_stop(uri: str) -> None:
    """Remove a marker left by an earlier, interrupted run (it would stop this one at once)."""
    fs, path = storage_fs(uri)
    if exists(fs, path):
        fs.delete_file(path)


def run_stoppable(fn: Callable[[], Any], uri: str | None) -> Any:
    """`fn()` (a Train `fit`) in a helper thread, this thread waiting; with `uri`, a first signal
    meanwhile writes that stop marker instead of stopping here. Outside the main thread: `fn()`."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    before, _state.stop_file = _state.stop_file, uri
    try:
        worker = threading.Thread(target=target, name="ray-train-fit", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(timeout=0.5)  # returns to run signal handlers
    finally:
        _state.stop_file = before
    if "error" in box:
        raise box["error"]
    return box["value"]
