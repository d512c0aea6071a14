"""Cheap per-epoch validation monitor: the metric a hyper-parameter search optimises.

Every `monitor.robust_every` epochs (and at the last epoch):
1. backbone features of the *train* split (eval transform, frozen encoder, gathered across ranks);
2. a linear probe fitted on them, full batch (standardised features, L-BFGS, small L2), the same
   probe on every rank (rank 0's weights are broadcast);
3. clean and PGD accuracy of encoder + probe on the held-out *val* split (never the test set),
   under the FIXED attack `monitor.val_attack` (8/255 L-inf by default): it does not follow the
   training attack, which a sweep may search over. The PGD is the project's engine
   (`trainer.attacks.pgd_attack` on `trainer.adversarial_training.ce_objective`).

Reported: `val_clean_acc`, `val_robust_acc` and `objective` (`tune.objective`: robust | clean |
weighted = w * robust + (1 - w) * clean with w = `tune.objective_weight`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from trainer.adversarial_training import ce_objective
from trainer.attacks import network_mode, pgd_attack
from trainer.evaluation.features import extract_features
from trainer.evaluation.probes import LinearProbe, ProbedClassifier, fit_linear_probe
from trainer.evaluation.robustness import pgd_config

OBJECTIVES = ("robust", "clean", "weighted")


def objective_value(clean: float, robust: float, tune_cfg: Mapping[str, Any] | None) -> float:
    tune_cfg = tune_cfg or {}
    kind = tune_cfg.get("objective", "robust")
    if kind == "robust":
        return robust
    if kind == "clean":
        return clean
    if kind == "weighted":
        w = float(tune_cfg.get("objective_weight", 0.5))
        return w * robust + (1.0 - w) * clean
    raise ValueError(f"tune.objective={kind!r} is invalid: allowed: {', '.join(OBJECTIVES)}")


class ValMonitor:
    """Built once per stage on every rank; `monitor(encoder)` returns the metrics to report."""

    def __init__(self, cfg: Mapping[str, Any], per_rank_batch: int, ctx) -> None:
        from data_pipeline.loaders import build_loader
        from data_pipeline.write import beton_path

        mon, data = cfg["monitor"], cfg["data"]
        if "val" not in data["splits"]:
            raise ValueError("monitor.robust_every > 0 needs a held-out val split (data.val_fraction > 0 and "
                             "'val' in data.splits); the test split is never used for model selection")
        self.ctx = ctx
        self.every = int(mon["robust_every"])
        self.attack = pgd_config(mon["val_attack"])
        self.probe_steps = int(mon.get("probe_steps", 100))
        self.probe_wd = float(mon.get("probe_weight_decay", 1e-3))
        cap = mon.get("val_max_examples")
        self.per_rank_cap = None if cap in (None, 0) else -(-int(cap) // ctx.world_size)
        self.num_classes = int(data["num_classes"])
        self.tune_cfg = cfg.get("tune") or {}
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
        from trainer.runtime import all_reduce_sum

        feats, labels = extract_features(encoder, self.train_loader)
        probe = fit_linear_probe(feats, labels, self.num_classes, weight_decay=self.probe_wd,
                                 max_iter=self.probe_steps)
        self._broadcast(probe)
        model = ProbedClassifier(encoder, probe)
        clean = robust = total = 0
        with network_mode([model], train=False):
            for batch in self.val_loader:  # read every batch (FFCV epochs must run to the end)
                x, y = batch["views"][0], batch["label"]
                if self.per_rank_cap is not None:
                    room = self.per_rank_cap - total
                    if room <= 0:
                        continue
                    x, y = x[:room], y[:room]
                clean += (model(x).argmax(1) == y).sum().item()
                x_adv = pgd_attack(x, ce_objective(model, y), self.attack)
                robust += (model(x_adv).argmax(1) == y).sum().item()
                total += y.shape[0]
        counts = all_reduce_sum({"clean": clean, "robust": robust, "total": total}, self.ctx)
        n = max(counts["total"], 1.0)
        out = {"val_clean_acc": counts["clean"] / n, "val_robust_acc": counts["robust"] / n,
               "val_n": counts["total"]}
        out["objective"] = objective_value(out["val_clean_acc"], out["val_robust_acc"], self.tune_cfg)
        return out


def build_val_monitor(cfg: Mapping[str, Any], per_rank_batch: int, ctx) -> ValMonitor | None:
    """None when `monitor.robust_every` is 0 (the default outside sweeps)."""
    if int((cfg.get("monitor") or {}).get("robust_every", 0) or 0) <= 0:
        return None
    return ValMonitor(cfg, per_rank_batch, ctx)
