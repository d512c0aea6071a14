"""Reporting attacks: the one clean + PGD counter (our engine); AutoAttack is in autoattack.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from trainer.adversarial_training import ce_objective
from trainer.attacks import PGDConfig, network_mode, pgd_attack


@dataclass
class RobustCounts:
    """Correct predictions on clean and PGD inputs (and, if kept, the adversarial images)."""

    clean: int = 0
    robust: int = 0
    total: int = 0
    source_robust: int = 0  # transfer (evaluate_on given): the attacked model's own accuracy on its examples
    adversarial: list[torch.Tensor] = field(default_factory=list)

    def counts(self) -> dict[str, float]:
        return {"clean": self.clean, "robust": self.robust, "total": self.total}


def as_xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a loader batch dict or of an (x, y) pair."""
    if isinstance(batch, dict):
        return batch["views"][0], batch["label"]
    return batch[0], batch[1]


def rank_share(n_examples: int | None, world_size: int) -> int | None:
    """One rank's share of an attack capped at `n_examples` images over all ranks (rounded up;
    None: no cap): the `max_examples` each rank passes to clean_and_pgd_counts."""
    return None if n_examples is None else -(-int(n_examples) // world_size)


def attacked_batches(n_batches: int, rank_cap: int | None, per_rank: int) -> int:
    """How many of a rank's `n_batches` a capped attack visits (the rest are read, not attacked):
    the total of its progress lines."""
    return n_batches if rank_cap is None else min(n_batches, -(-rank_cap // per_rank))


def clean_and_pgd_counts(model: nn.Module, batches: Iterable[Any], attack: PGDConfig,
                         max_examples: int | None = None, keep_adversarial: bool = False,
                         on_batch: Callable[[RobustCounts], None] | None = None,
                         evaluate_on: nn.Module | None = None) -> RobustCounts:
    """Count correct predictions of `model` (eval mode) on clean and PGD (CE) inputs.

    `batches`: loader batches or (x, y) pairs on the model's device. `max_examples` caps how many
    images are attacked; later batches are still read to the end (an FFCV epoch must finish).
    `keep_adversarial`: also keep the adversarial images (on the CPU, in order). `on_batch` is
    called with the counts so far after each attacked batch (progress lines). `evaluate_on`: a
    black-box transfer attack: the examples are crafted on `model` (the surrogate) and `clean` /
    `robust` count `evaluate_on`'s correct predictions (`source_robust`: the surrogate's own).
    """
    out = RobustCounts()
    target = model if evaluate_on is None else evaluate_on
    with network_mode([model, target], train=False):
        for batch in batches:
            x, y = as_xy(batch)
            if max_examples is not None:
                room = max_examples - out.total
                if room <= 0:
                    continue
                x, y = x[:room], y[:room]
            with torch.no_grad():
                out.clean += int((target(x).argmax(1) == y).sum())
            x_adv = pgd_attack(x, ce_objective(model, y), attack)
            with torch.no_grad():
                out.robust += int((target(x_adv).argmax(1) == y).sum())
                if evaluate_on is not None:
                    out.source_robust += int((model(x_adv).argmax(1) == y).sum())
            out.total += int(y.shape[0])
            if keep_adversarial:
                out.adversarial.append(x_adv.cpu())
            if on_batch is not None:
                on_batch(out)
    return out
