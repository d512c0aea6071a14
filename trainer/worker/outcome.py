"""How a worker loop ends, as Ray's `Result.return_value` (rank 0), and the errors the driver raises.

Statuses: "completed"; "nonfinite" (a non-finite loss: the run stops without retries, keeping its
last good checkpoint); "mismatch" (the checkpoint Ray resumed belongs to another config).
`trainer.launch.run_train_stage` turns the last two into the exceptions below.
"""
from __future__ import annotations

from typing import Any

from conf import ConfigError


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the run stopped and kept its last good checkpoint."""


class RunMismatchError(ConfigError):
    """A run folder / checkpoint belongs to a different config (or stage) than this job's: a user's
    choice of run_name, so the entry points print it as one line and exit with status 2."""


def completed(**info: Any) -> dict[str, Any]:
    return {"status": "completed", **info}


def nonfinite(message: str, epoch: int) -> dict[str, Any]:
    return {"status": "nonfinite", "message": message, "epoch": epoch}


def mismatch(message: str) -> dict[str, Any]:
    return {"status": "mismatch", "message": message}
