"""SIGINT / SIGTERM in a driver running Ray Tune trials (tune.search, `trainer.run seeds=[...]`, the
study): every running trial's Ray Train run stops between steps, as a plain run's does.

Tune's own stop (its Ctrl-C handler, SIGUSR1) saves the experiment state and then ends the trial
actors at once: a trial's Train run dies mid-epoch, its last report may never reach Tune, and the
restored trial redoes that epoch. Here, after a first signal, the driver (`StopTrials`, a Tune
callback run by Tune's loop in the driver's main thread):

1. writes the stop marker of every running trial's Train run(s) — `signals.stop_file(
   launch.trainer_path(cfg, run))`, the marker `python -m trainer.run` uses — and writes it again
   every second until the trial answers (a Train run that is just starting removes a marker it
   finds: it would be an earlier session's);
2. the trial's workers stop after their current step, their last report is the last finished
   epoch, Ray registers its checkpoint and `fit()` returns; the trial then acknowledges
   (`<experiment>/stop_requests/<trial id>`, holding this driver's token and that epoch) and waits
   to be ended (returning would make Tune record it finished; `park`);
3. once every running trial has answered and Tune has received its last epoch (or after WAIT_S:
   a trial in an evaluation stage, or not yet in a Train run, does not answer), it runs Tune's own
   graceful stop (`signals.tune_graceful_stop`): Tune saves the experiment state with those trials
   unfinished and ends their actors. Restoring the sweep continues each one after its last
   finished epoch.

The callback is part of the Tuner's RunConfig, so Tune pickles it into the experiment and a restored
sweep has it again; what belongs to this driver (its token, the signal) is in this module, not in it.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from ray.tune import Callback

from trainer import signals
from trainer.storage import absolute_location, read_text, write_text

BOARD = "stop_requests"
REQUEST = "request"
WAIT_S = 45.0  # below cluster/runtime_env.yaml's RAY_JOB_STOP_WAIT_TIME_S (60): Tune's save still happens
REWRITE_S = 1.0


class _Session:
    """This driver's part (never pickled with the callback)."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex  # tells this driver's acknowledgements from an earlier session's
        self.asked_at: float | None = None  # when the markers were first written
        self.written_at = 0.0
        self.active = False  # a StopTrials callback runs in Tune's loop now
        self.stopped: list[str] = []  # trial ids that answered


_session = _Session()


def board_path(experiment: str) -> str:
    """Where the driver's request and the trials' acknowledgements live: inside the Tune experiment."""
    return f"{absolute_location(experiment).rstrip('/')}/{BOARD}"


class StopTrials(Callback):
    """Tune callback: after the driver's first signal, stop the running trials' Train runs between steps,
    then Tune's graceful stop. `markers(trial)`: the stop markers of that trial's Train run(s)."""

    def __init__(self, experiment: str, markers: Callable[[Any], Sequence[str]]) -> None:
        self.board = board_path(experiment)
        self.markers = markers

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        _session.active = True

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if signals.received() is None:
            return
        now = time.monotonic()
        if _session.asked_at is None:
            _session.asked_at = now
            write_text(f"{self.board}/{REQUEST}", _session.token)
        waiting = [t for t in trials if t.status == "RUNNING" and not self._answered(t)]
        if waiting and now - _session.asked_at < WAIT_S:
            if now - _session.written_at >= REWRITE_S:
                _session.written_at = now
                for trial in waiting:
                    for marker in self.markers(trial):
                        signals.request_stop(marker)
            return
        if waiting:
            print(f"[tune] {len(waiting)} trial(s) did not stop at a step within {WAIT_S:.0f}s "
                  f"({', '.join(t.trial_id for t in waiting)}): Tune ends them now", file=sys.stderr, flush=True)
        if not signals.tune_graceful_stop():
            raise signals.interrupted("while Tune's loop was not running")

    def _answered(self, trial: Any) -> bool:
        """The trial acknowledged this driver's request, and Tune has its last finished epoch."""
        text = read_text(f"{self.board}/{trial.trial_id}")
        if not text:
            return False
        ack = json.loads(text)
        if ack.get("token") != _session.token:  # an earlier session's
            return False
        if trial.trial_id not in _session.stopped:
            _session.stopped.append(trial.trial_id)
        epoch = ack.get("epoch")
        return epoch is None or int((trial.last_result or {}).get("epoch", 0)) >= int(epoch)


def first_signal(signum: int, frame: Any) -> bool:
    """The delegate of `signals.handle` during a sweep: True when the callback will stop the trials."""
    import signal

    name = signal.Signals(signum).name
    if _session.active:
        print(f"[tune] {name}: stopping every running trial after its current training step "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        return True
    if signals.tune_graceful_stop(signum, frame):  # a restored sweep started without the callback
        print(f"[tune] {name}: Tune's own stop (send it again to stop at once)", file=sys.stderr, flush=True)
        return True
    return False  # Tune's loop has not started: nothing to save, stop at once


@contextmanager
def stopping_trials_between_steps() -> Iterator[None]:
    """Around `Tuner.fit()` with a StopTrials callback: a first signal is handled by it."""
    global _session
    _session = _Session()
    with signals.delegated_to_tune(first_signal):
        try:
            yield
        finally:
            _session.active = False


def stopped_trials() -> list[str]:
    """The trials that stopped at a step after this driver's signal (their ids)."""
    return list(_session.stopped)


def park(experiment: str, trial_id: str, epoch: int | None) -> None:
    """In a trial stopped at the driver's request: acknowledge, then wait until Tune ends this actor.

    Returning would make Tune record the trial finished (TERMINATED: never resumed), and Tune keeps
    collecting results from a trial that is still running, so the last epoch's report reaches it."""
    board = board_path(experiment)
    token = read_text(f"{board}/{REQUEST}") or ""
    write_text(f"{board}/{trial_id}", json.dumps({"token": token.strip(), "epoch": epoch}))
    print(f"[trial {trial_id}] stopped at the driver's request"
          + (f" after epoch {epoch}" if epoch is not None else "") + "; waiting for Tune to end it", flush=True)
    threading.Event().wait()
