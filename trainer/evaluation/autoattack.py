"""AutoAttack as its authors run it: the fra31 code (the `pyautoattack` package), standard version.

The standard version is APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes), each at 100
iterations, then Square with 5,000 queries; each attack runs on the points the earlier ones left
robust. The robust accuracy after each attack is read from AutoAttack's own log, which also drives
our progress lines (images done, robust accuracy so far, ETA within the attack).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from trainer.attacks import network_mode
from trainer.progress import Progress

AFTER = re.compile(r"robust accuracy after (\S+): ([0-9.]+)%")
INITIAL = re.compile(r"^initial accuracy: ([0-9.]+)%")
RUNNING = re.compile(r"^running (\S+)$")
BATCH = re.compile(r"^(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed")
LOGGER = "auto-attack"
VERSION_ATTACKS = {  # pyautoattack's AutoAttack._set_version, in the order they run
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}


def result_keys(version: str) -> list[str]:
    """The metric names a run of this version reports (the same on every rank)."""
    return ["aa", "aa_n", "aa_sa", "aa_ra", *(after_key(a) for a in VERSION_ATTACKS[version])]


def after_key(attack: str) -> str:
    return "aa_after_" + attack.replace("-", "_")


@dataclass
class AutoAttackResult:
    """Robust accuracy under AutoAttack on n images, and after each of its attacks (from its log)."""

    robust: float
    n: int
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class _LogReader(logging.Handler):
    """Reads AutoAttack's log records: the robust accuracy after each attack, and progress."""

    def __init__(self, n: int, on_batch: Callable[[str, int, int, int], None],
                 on_after: Callable[[str, float], None]) -> None:
        super().__init__(logging.DEBUG)
        self.n, self.on_batch, self.on_after, self.after = n, on_batch, on_after, {}
        self.robust, self.started = n, time.time()  # robust points left; when the current attack began

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if m := INITIAL.search(msg):
            self.robust = round(float(m.group(1)) / 100 * self.n)
        elif RUNNING.search(msg):
            self.started = time.time()
        elif m := AFTER.search(msg):
            # the log prints 2 decimals of a percent: exact counts for up to 10,000 images
            accuracy = round(float(m.group(2)) / 100 * self.n) / self.n
            self.after[m.group(1).lower()] = accuracy
            self.on_after(m.group(1).lower(), accuracy)
        elif m := BATCH.search(msg):
            attack, batch, batches, fooled = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
            self.on_batch(attack, batch, batches, fooled)


def build_autoattack(model: nn.Module, eps: float, norm: str, num_classes: int, version: str, seed: int,
                     device: torch.device | str):
    """pyautoattack.AutoAttack with the authors' settings (fewer targets with fewer than 10 classes)."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, eps=eps, norm=norm, version=version, seed=seed, device=device)
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, num_classes - 1)
    return aa


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, num_classes: int,
                   norm: str = "Linf", version: str = "standard", seed: int = 0, batch_size: int = 256,
                   label: str = "autoattack", show: bool = True) -> AutoAttackResult:
    """Robust accuracy of `model` (in eval mode) under AutoAttack on (x, y), with progress lines."""
    t0 = time.time()

    def on_batch(attack: str, batch: int, batches: int, fooled: int) -> None:
        reader.robust -= fooled
        if show:
            Progress.items_line(label, f"AutoAttack {attack}", batch, batches, time.time() - reader.started,
                                {"robust_so_far": reader.robust / max(1, len(y))}, unit="batches")

    def on_after(attack: str, accuracy: float) -> None:
        if show:
            print(f"[{label}] AutoAttack after {attack}: robust {accuracy:.4f} of {len(y)} images "
                  f"| {time.time() - t0:.0f}s so far", flush=True)

    logger = logging.getLogger(LOGGER)
    reader, level, propagate = _LogReader(len(y), on_batch, on_after), logger.level, logger.propagate
    logger.addHandler(reader)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # its own debug lines would repeat ours
    try:
        with network_mode([model], train=False):
            aa = build_autoattack(model, eps, norm, num_classes, version, seed, x.device)
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
            with torch.no_grad():
                correct = sum(int((model(xb).argmax(1) == yb).sum())
                              for xb, yb in zip(x_adv.split(batch_size), y.split(batch_size)))
    finally:
        logger.removeHandler(reader)
        logger.setLevel(level)
        logger.propagate = propagate
    # AutoAttack skips the attacks after the robust points run out: robust accuracy 0 after those
    after = {a: reader.after.get(a, 0.0) for a in VERSION_ATTACKS[version]}
    return AutoAttackResult(correct / max(1, len(y)), int(len(y)), after, time.time() - t0)
