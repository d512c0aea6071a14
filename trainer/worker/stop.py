"""The worker side of a driver's stop request (trainer/signals.py): the epoch loop asks between steps.

The driver writes a marker file at the path the stage payload names (`stop_file`). Each rank looks
for it at most every `POLL_S` seconds (a stat, or one request on object storage), and with several
ranks they agree by an all-reduce (max) of that flag over a gloo group of their own, on the CPU,
so no rank leaves a collective the others still wait in and no GPU stream is synchronised.
"""
from __future__ import annotations

import time
import torch
import torch.distributed as dist

from trainer.distributed import WorkerContext
from trainer.storage import exists, storage_fs

POLL_S = 0.5


class StopRequest:
    """`requested()`: has the driver asked this run to stop? The same answer on every rank."""

    def __init__(self, uri: str | None, ctx: WorkerContext) -> None:
        self.fs, self.path, self.seen, self.last = None, "", False, 0.0
        if uri:
            self.fs, self.path = storage_fs(uri)
        # Every rank creates the group in the same order (here, before the first epoch).
        self.group = dist.new_group(backend="gloo") if ctx.world_size > 1 and dist.is_initialized() else None

    def _local(self) -> bool:
        if self.seen or self.fs is None:
            return self.seen
        now = time.monotonic()
        if now - self.last >= POLL_S:
            self.last = now
            self.seen = exists(self.fs, self.path)
        return self.seen

    def requested(self) -> bool:
        local = self._local()
        if self.group is None:
            return local
        flag = torch.tensor([1.0 if local else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.seen = bool(flag.item() > 0)
        return self.seen

