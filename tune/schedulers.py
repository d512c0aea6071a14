"""Trial schedulers: ASHA whose rungs survive a restore, or FIFO (every trial runs its budget)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from tune.analyze import read_jsonl


def trial_history(trial: Any) -> list[dict[str, Any]]:
    """The results a trial reported before (its result.json), [] for a new trial."""
    roots = []
    for attr in ("local_path", "path"):
        try:
            roots.append(getattr(trial, attr))
        except Exception:  # a new trial has no folder yet
            pass
    for root in roots:
        if root and "://" not in str(root) and Path(root, "result.json").exists():
            return read_jsonl(Path(root, "result.json"))
    return []


class ReplayASHA(ASHAScheduler):
    """ASHA whose rungs are rebuilt from restored trials' results (Tune does not save them)."""

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for r in trial_history(trial):
            if self._time_attr in r and self._metric in r:
                bracket.on_result(trial, r[self._time_attr], self._metric_op * r[self._metric])


def make_scheduler(cfg: Mapping[str, Any]):
    """ASHA on epochs (`time_attr="epoch"`, so a resumed trial keeps its rungs), or FIFO."""
    sched = cfg["tune"]["scheduler"]
    if sched["name"] == "fifo":
        return FIFOScheduler()
    return ReplayASHA(time_attr="epoch", max_t=int(cfg["method"]["train"]["epochs"]),
                      grace_period=int(sched["grace_period"]), reduction_factor=float(sched["reduction_factor"]),
                      brackets=int(sched["brackets"]))
