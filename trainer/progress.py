"""Progress lines with throughput and ETA (one helper for training, heads and evaluation)."""
from __future__ import annotations

import time
from typing import Mapping

HIDDEN = ("epoch", "images_per_s", "epoch_time_s")


class Progress:
    """`[stage] epoch 3/8 loss 0.41 | 210 img/s | 6.1s/epoch | eta 0.5 min` (rank 0 only)."""

    def __init__(self, stage: str, epochs: int, start_epoch: int, enabled: bool) -> None:
        self.stage, self.epochs, self.enabled = stage, epochs, enabled
        self.t0, self.done0 = time.time(), start_epoch

    def epoch_line(self, epoch: int, images: int, seconds: float, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        done = epoch + 1 - self.done0
        eta = (time.time() - self.t0) / max(done, 1) * (self.epochs - epoch - 1)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                         if k not in HIDDEN and isinstance(v, (int, float)))
        print(f"[{self.stage}] epoch {epoch + 1}/{self.epochs} {shown} | {images / max(seconds, 1e-9):.0f} img/s "
              f"| {seconds:.1f}s/epoch | eta {eta / 60:.1f} min", flush=True)

    @staticmethod
    def items_line(stage: str, what: str, done: int, total: int, seconds: float, metrics: Mapping[str, float],
                   unit: str = "images") -> None:
        """`[stage] PGD-20 256/360 images robust_so_far 0.41 | 40 images/s | eta 0.1 min` (evaluation)."""
        eta = seconds / max(done, 1) * (total - done)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"[{stage}] {what} {done}/{total} {unit} {shown} | {done / max(seconds, 1e-9):.3g} {unit}/s "
              f"| eta {eta / 60:.1f} min", flush=True)
