"""Evaluations of a trained head beyond the white-box test split: common corruptions and RoCL's
black-box transfer attack.

- Corruptions (ACL's test2adversarial.py reads CIFAR-10-C the same way: `<corruption>.npy` and
  `labels.npy`, pixels / 255, no other transform): accuracy per corruption and severity, the mean of
  each corruption over its severities (what ACL reports per corruption: its loader takes all 50,000
  images, the 5 severities together) and the mean over everything. Images are sharded across ranks.
- Black-box: PGD (eval.pgd, the project's one PGD) crafted on a surrogate classifier, the target head
  evaluated on those examples (`clean_and_pgd_counts(..., evaluate_on=target)`).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from data_pipeline.sources import corruption_split
from trainer.attacks import network_mode, pgd_config
from trainer.distributed import WorkerContext, all_reduce_sum
from trainer.evaluation.robustness import RobustCounts, clean_and_pgd_counts, rank_share
from trainer.progress import Progress


def corruption_key(prefix: str, name: str, severity: int | None = None) -> str:
    """`<p>_c_<name>_s<severity>` (one severity) or `<p>_c_<name>` (its mean over the severities)."""
    return f"{prefix}_c_{name}" + ("" if severity is None else f"_s{severity}")


@torch.no_grad()
def correct_count(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int,
                  device: torch.device) -> int:
    """Correct predictions of `model` (eval mode) on HWC uint8 images, in batches."""
    correct = 0
    with network_mode([model], train=False):
        for start in range(0, len(labels), batch):
            x = torch.from_numpy(images[start:start + batch]).to(device).permute(0, 3, 1, 2).float().div_(255)
            y = torch.from_numpy(labels[start:start + batch]).to(device)
            correct += int((model(x).argmax(1) == y).sum())
    return correct


def measure_corruptions(cfg: Mapping[str, Any], ctx: WorkerContext, model: nn.Module, prefix: str, stage: str,
                        batch: int) -> dict[str, float]:
    """Accuracy on every eval.corruptions name x severity (this rank's share of each block, summed)."""
    cc = cfg["eval"]["corruptions"]
    out: dict[str, float] = {}
    t0, names = time.time(), list(cc["names"])
    n_per = 0
    for i, name in enumerate(names):
        counts: dict[str, float] = {}
        for sev in cc["severities"]:
            images, labels = corruption_split(cc["root"], name, int(sev), cc["n_examples"])
            mine = slice(ctx.rank, None, ctx.world_size)  # every image once across ranks
            counts[f"c{sev}"] = correct_count(model, images[mine], labels[mine], batch, ctx.device)
            n_per = len(labels)
        summed = all_reduce_sum(counts, ctx)
        for sev in cc["severities"]:
            out[corruption_key(prefix, name, int(sev))] = summed[f"c{sev}"] / n_per
        out[corruption_key(prefix, name)] = float(np.mean([out[corruption_key(prefix, name, int(s))]
                                                           for s in cc["severities"]]))
        if ctx.is_main:
            Progress.items_line(stage, "corruptions", i + 1, len(names), time.time() - t0,
                                {name: out[corruption_key(prefix, name)]}, unit="corruptions")
    out[f"{prefix}_c_mean"] = float(np.mean([out[corruption_key(prefix, n)] for n in names]))
    out[f"{prefix}_c_n"] = n_per
    if ctx.is_main:
        print(f"[{stage}] corruptions: mean accuracy {out[f'{prefix}_c_mean']:.4f} over {len(names)} corruptions x "
              f"severities {list(cc['severities'])} ({n_per} images each)", flush=True)
    return out


def measure_blackbox(cfg: Mapping[str, Any], ctx: WorkerContext, target: nn.Module, surrogate: nn.Module,
                     prefix: str, stage: str, batches: Iterable[Any],
                     on_batch: Callable[[RobustCounts], None] | None = None) -> dict[str, float]:
    """Target accuracy on PGD examples crafted on `surrogate` (test split, sharded): `<p>_bb_sa` (target,
    clean), `<p>_bb_ra` (target, transferred), `<p>_bb_surrogate_ra` (surrogate, white-box), `<p>_bb_n`."""
    bb = cfg["eval"]["blackbox"]
    pgd = pgd_config(cfg["eval"]["pgd"])
    cap = rank_share(bb["n_examples"], ctx.world_size)
    c = clean_and_pgd_counts(surrogate, batches, pgd, max_examples=cap, on_batch=on_batch, evaluate_on=target)
    s = all_reduce_sum({"clean": c.clean, "robust": c.robust, "source": c.source_robust, "total": c.total}, ctx)
    n = max(1.0, s["total"])
    out = {f"{prefix}_bb_sa": s["clean"] / n, f"{prefix}_bb_ra": s["robust"] / n,
           f"{prefix}_bb_surrogate_ra": s["source"] / n, f"{prefix}_bb_n": s["total"]}
    if ctx.is_main:
        print(f"[{stage}] black-box PGD-{pgd.steps} from the surrogate on {int(s['total'])} test images: target "
              f"{out[f'{prefix}_bb_ra']:.4f} (clean {out[f'{prefix}_bb_sa']:.4f}); the surrogate itself (white-box) "
              f"{out[f'{prefix}_bb_surrogate_ra']:.4f}", flush=True)
    return out
