"""ASHA's stopping rule replayed offline on recorded per-epoch histories (no training; seconds).

A finished full-budget sweep (every configuration trained to the end) says what every trial would
have reported at every epoch; replaying the rule on it says what an ASHA sweep of the same
configurations would have spent and found (the determinism work makes a trial's history the same
whichever sweep runs it). The rule is Ray's `ASHAScheduler` with one bracket: the rungs are
`tune.analyze.asha_rungs` (grace_period x reduction_factor^k, in `time_attr` units); a result
whose time reaches a rung the trial has not recorded at is compared with the
(1 - 1/reduction_factor) quantile of what that rung recorded BEFORE it, and the trial stops when
below it; a trial stops anyway once its time reaches max_t. Trials are replayed one after the
other (one trial at a time: a live sweep with max_concurrent_trials=1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from tune.analyze import asha_rungs


@dataclass
class AshaRule:
    """One ASHA bracket: rungs (descending) and what each recorded, trial id -> signed metric."""

    grace_period: float
    reduction_factor: float
    max_t: float
    mode: str = "max"
    rungs: list[float] = field(default_factory=list)
    recorded: dict[float, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sched = {"name": "asha", "grace_period": self.grace_period, "reduction_factor": self.reduction_factor}
        self.rungs = sorted(asha_rungs({"tune": {"scheduler": sched}}, self.max_t), reverse=True)
        self.recorded = {r: {} for r in self.rungs}

    def cutoff(self, rung: float) -> float | None:
        import numpy as np

        values = list(self.recorded[rung].values())
        return float(np.nanpercentile(values, (1 - 1 / self.reduction_factor) * 100)) if values else None

    def on_result(self, trial_id: str, time: float, metric: float) -> bool:
        """True when the trial goes on after this result, False when ASHA stops it."""
        signed = metric if self.mode == "max" else -metric
        go_on = time < self.max_t
        for rung in self.rungs:  # the highest rung reached and not yet recorded at (one per result)
            if time < rung or trial_id in self.recorded[rung]:
                continue
            cut = self.cutoff(rung)
            if cut is not None and signed < cut:
                go_on = False
            self.recorded[rung][trial_id] = signed
            break
        return go_on


def replay_trial(rule: AshaRule, trial_id: str, history: list[Mapping[str, Any]], metric: str,
                 time_attr: str) -> list[Mapping[str, Any]]:
    """The part of a trial's history that ASHA lets it run (its results up to the stop)."""
    ran = []
    for h in history:
        if metric not in h or time_attr not in h:
            break
        ran.append(h)
        if not rule.on_result(trial_id, float(h[time_attr]), float(h[metric])):
            break
    return ran


def replay_asha(trials: Iterable[Mapping[str, Any]], rule: AshaRule, metric: str, time_attr: str,
                max_epochs: int) -> dict[str, Any]:
    """Replay on trials ({"trial_id", "history"}) in the given order: what ASHA spends and finds.

    Returns trial-epochs and compute spent, how many trials ran all `max_epochs` epochs and the best
    metric among them (the leaderboard's rule), and the epochs each trial ran.
    """
    epochs_ran, spent_epochs, spent_compute, finals = {}, 0, 0.0, []
    for t in trials:
        ran = replay_trial(rule, t["trial_id"], t["history"], metric, time_attr)
        epochs_ran[t["trial_id"]] = len(ran)
        spent_epochs += len(ran)
        spent_compute += float(ran[-1].get("compute", 0)) if ran else 0.0
        if ran and int(ran[-1]["epoch"]) >= max_epochs:
            finals.append(float(ran[-1][metric]))
    best = (max(finals) if rule.mode == "max" else min(finals)) if finals else None
    return {"trials": len(epochs_ran), "trial_epochs": spent_epochs, "compute": spent_compute,
            "full_budget_trials": len(finals), "best": best, "epochs_ran": epochs_ran,
            "rungs": sorted(rule.rungs)}
