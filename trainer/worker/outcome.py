"""How a worker loop ends, as Ray's `Result.return_value` (rank 0), and the errors the driver raises.

Statuses: "completed"; "nonfinite" (a non-finite loss: the run stops without retries, keeping its
last good checkpoint); "mismatch" (the checkpoint Ray resumed belongs to another config);
"interrupted" (the driver asked the workers to stop, trainer/signals.py: returned after the last
report, so Ray registers that epoch's checkpoint). `trainer.launch.run_train_stage` turns these
into the exceptions below (and trainer.signals' RunStopped); a worker group that keeps dying
becomes TrainingFailed.
"""
from __future__ import annotations

from typing import Any

from conf import ConfigError


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the run stopped and kept its last good checkpoint."""


class RunMismatchError(ConfigError):
    """A run folder / checkpoint belongs to a different config (or stage) than this job's: a user's
    choice of run_name, so the entry points print it as one line and exit with status 2."""


class TrainingFailed(RuntimeError):
    """Ray Train gave up on a stage: its worker group failed more than cluster.max_failures times.
    `stage`, `epoch` (the last epoch with a registered checkpoint), `cause` (one phrase), `details`
    (Ray's full error text, for a log file)."""

    def __init__(self, stage: str, epoch: int, cause: str, details: str) -> None:
        super().__init__(f"{stage}: {cause}")
        self.stage, self.epoch, self.cause, self.details = stage, epoch, cause, details


def completed(**info: Any) -> dict[str, Any]:
    return {"status": "completed", **info}


def nonfinite(message: str, epoch: int) -> dict[str, Any]:
    return {"status": "nonfinite", "message": message, "epoch": epoch}


def mismatch(message: str) -> dict[str, Any]:
    return {"status": "mismatch", "message": message}


def interrupted(epoch: int) -> dict[str, Any]:
    """Stopped on the driver's request; `epoch`: the last finished (reported) epoch."""
    return {"status": "interrupted", "epoch": epoch}
