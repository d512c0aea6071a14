"""Trial schedulers: ASHA whose rungs survive a restore, BOHB's HyperBand, or FIFO (every trial runs its budget)."""
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


def scheduler_max_t(cfg: Mapping[str, Any]) -> int:
    """A trial's budget in `tune.time_attr` units: `tune.scheduler.max_t`, else the epochs."""
    return int(cfg["tune"]["scheduler"]["max_t"] or cfg["method"]["train"]["epochs"])


def make_scheduler(cfg: Mapping[str, Any]):
    """ASHA on `tune.time_attr` (epochs, or the worker's cumulative `compute`) whose rungs survive a
    restore; HyperBandForBOHB for `tune.search_alg=bohb` (epochs); or FIFO."""
    t = cfg["tune"]
    sched = t["scheduler"]
    if sched["name"] == "fifo":
        return FIFOScheduler()
    if t["search_alg"] == "bohb":
        from ray.tune.schedulers import HyperBandForBOHB

        return HyperBandForBOHB(time_attr="epoch", max_t=scheduler_max_t(cfg),
                                reduction_factor=float(sched["reduction_factor"]))
    return ReplayASHA(time_attr=t["time_attr"], max_t=scheduler_max_t(cfg), grace_period=int(sched["grace_period"]),
                      reduction_factor=float(sched["reduction_factor"]), brackets=int(sched["brackets"]))


def describe_scheduler(cfg: Mapping[str, Any]) -> str:
    """One phrase for the progress line: which scheduler, on which axis, with which budget."""
    t, sched = cfg["tune"], cfg["tune"]["scheduler"]
    if sched["name"] == "fifo":
        return f"FIFO (every trial runs {cfg['method']['train']['epochs']} epochs)"
    if t["search_alg"] == "bohb":
        return f"HyperBandForBOHB on epochs (max_t={scheduler_max_t(cfg)}, reduction factor {sched['reduction_factor']:g})"
    return (f"ASHA on {t['time_attr']} (max_t={scheduler_max_t(cfg)}, grace period {sched['grace_period']}, "
            f"reduction factor {sched['reduction_factor']:g})")
