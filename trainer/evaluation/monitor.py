"""Cheap per-epoch validation monitor: the metric a hyper-parameter search optimises.

Every `monitor.robust_every` epochs (and at the last epoch):
1. backbone features of the *train* split (eval transform, frozen encoder, gathered across ranks);
2. a linear probe fitted on them, full batch (standardised features, L-BFGS, small L2), the same
   probe on every rank (rank 0's weights are broadcast);
3. clean and PGD accuracy of encoder + probe on the held-out *val* split (never the test set),
   under the FIXED attack `monitor.val_attack` (8/255 L-inf by default): it does not follow the
   training attack, which a sweep may search over. The counting is the evaluation's own
   (`trainer.evaluation.robustness.clean_and_pgd_counts`).

Reported: `val_clean_acc`, `val_robust_acc` and `objective` (`tune.objective`: robust | clean |
weighted = w * robust + (1 - w) * clean with w = `tune.objective_weight`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from data_pipeline.loaders import build_loader
from data_pipeline.write import beton_path
from trainer.attacks import pgd_config
from trainer.distributed import WorkerContext, all_reduce_sum
from trainer.evaluation.features import extract_features
from trainer.evaluation.probes import LinearProbe, ProbedClassifier, fit_linear_probe
from trainer.evaluation.robustness import clean_and_pgd_counts, rank_share

def objective_value(clean: float, robust: float, tune_cfg: Mapping[str, Any]) -> float:
    """`tune.objective` of the val accuracies: robust | clean | w * robust + (1 - w) * clean."""
    kind = tune_cfg["objective"]
    if kind == "robust":
        return robust
    if kind == "clean":
        return clean
    w = float(tune_cfg["objective_weight"])
    return w * robust + (1.0 - w) * clean


class ValMonitor:
    """Built once per stage on every rank; `monitor(encoder)` returns the metrics to report."""

    def __init__(self, cfg: Mapping[str, Any], per_rank_batch: int, ctx: WorkerContext) -> None:
        mon, data = cfg["monitor"], cfg["data"]
        self.ctx = ctx
        self.every = int(mon["robust_every"])
        self.attack = pgd_config(mon["val_attack"])
        self.probe_steps = int(mon["probe_steps"])
        self.probe_wd = float(mon["probe_weight_decay"])
        self.per_rank_cap = rank_share(mon["val_max_examples"], ctx.world_size)
        self.num_classes = int(data["num_classes"])
        self.tune_cfg = cfg["tune"]
        self.train_loader, self.val_loader = (
            build_loader(str(beton_path(data, s)), "eval", per_rank_batch, ctx.device, ctx.num_threads,
                         train=False, distributed=ctx.distributed, drop_last=False) for s in ("train", "val"))

    def due(self, epoch: int, epochs: int) -> bool:
        """`epoch` counts from 1."""
        return epoch % self.every == 0 or epoch == epochs

    def _broadcast(self, probe: LinearProbe) -> None:
        import torch.distributed as dist

        if self.ctx.distributed and dist.is_initialized():
            for t in [*probe.buffers(), *probe.parameters()]:
                dist.broadcast(t.data, src=0)

    @torch.no_grad()
    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        feats, labels = extract_features(encoder, self.train_loader)
        probe = fit_linear_probe(feats, labels, self.num_classes, weight_decay=self.probe_wd,
                                 max_iter=self.probe_steps)
        self._broadcast(probe)
        counts = clean_and_pgd_counts(ProbedClassifier(encoder, probe), self.val_loader, self.attack,
                                      max_examples=self.per_rank_cap)
        total = all_reduce_sum(counts.counts(), self.ctx)
        n = max(total["total"], 1.0)
        out = {"val_clean_acc": total["clean"] / n, "val_robust_acc": total["robust"] / n, "val_n": total["total"]}
        out["objective"] = objective_value(out["val_clean_acc"], out["val_robust_acc"], self.tune_cfg)
        return out


def build_val_monitor(cfg: Mapping[str, Any], per_rank_batch: int, ctx: WorkerContext) -> ValMonitor | None:
    """None when `monitor.robust_every` is 0 (the default outside sweeps)."""
    if cfg["monitor"]["robust_every"] <= 0:
        return None
    return ValMonitor(cfg, per_rank_batch, ctx)
