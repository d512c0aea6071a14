"""TrainState: everything a pre-training stage needs to continue exactly, saving and restoring itself.

A checkpoint folder holds `model.pt` (the exported single-BN encoder: what evaluation and the
next stage load), `model_full.pt` (the trainable module when it differs, e.g. dual BN or a
classifier head) and `state.pt`: the stage's identity (config hash, run, recipe, stage, method),
epochs done, optimiser, schedule, the method's other modules, every rank's RNG streams (the
loader's colour-augmentation generator included), the epochs at which the run was resumed and
the history of every epoch's report, and every rank's own state: its RNG streams and its modules'
buffers (BatchNorm running statistics stay per rank under DDP, and a rank's PGD in eval mode reads
its own). The loader's position is the epoch count: epoch e's shuffle order is a function of
(seed, e) and every augmentation of (seed, e, sample index, view). `manifest.json`, written last,
records each file's size and sha256 (trainer.checkpoint.verify_checkpoint).

Resuming continues exactly: a run resumed from the checkpoint of epoch k (an interrupted epoch k+1
is restarted from its beginning) ends with the same weights and metrics as the uninterrupted run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from trainer.checkpoint import (MODEL_FILE, STATE_FILE, atomic_save, rng_state, save_model, set_rng_state,
                                write_manifest)
from trainer.distributed import WorkerContext
from trainer.methods import Method
from trainer.models import Encoder

FULL_MODEL_FILE = "model_full.pt"
IDENTITY_KEYS = ("config_hash", "stage", "method")


def identity_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """Why a saved state belongs to another run than `expected` (None if it is this run's)."""
    for key in IDENTITY_KEYS:
        if key in saved and saved[key] != expected[key]:
            return (f"the checkpoint Ray resumed for run '{expected['run_name']}' stage '{expected['stage']}' "
                    f"has {key}={saved[key]!r} but this job has {key}={expected[key]!r}: it belongs to another "
                    "configuration. Use a different run_name (or leave run_name unset: it is derived from the "
                    "config hash), or delete that run's folder in the storage path.")
    return None


@dataclass
class TrainState:
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any                              # data_pipeline.loaders.ViewLoader
    identity: dict[str, Any]                 # which run and stage this state belongs to
    epoch: int = 0                           # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)
    saved_world_size: int | None = None      # workers of the run that wrote the restored checkpoint

    def end_epoch(self, report: Mapping[str, Any]) -> None:
        self.epoch += 1
        self.history.append({k: v for k, v in report.items() if isinstance(v, (int, float))})

    # ---------------------------------------------------------------------------------- saving
    def rank_state(self) -> dict[str, Any]:
        """This rank's own state: RNG streams and the buffers of the checkpointed modules."""
        buffers = {name: {k: b.detach().cpu() for k, b in m.named_buffers()}
                   for name, m in self.method.modules_to_checkpoint().items()}
        return {"rng": rng_state(), "buffers": buffers}

    def gather_ranks(self, ctx: WorkerContext) -> list[dict[str, Any]]:
        """Every rank's own state (a collective: every rank calls it)."""
        mine = self.rank_state()
        if not ctx.distributed:
            return [mine]
        gathered: list[Any] = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return gathered

    def state_dict(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        modules = {k: m.state_dict() for k, m in self.method.modules_to_checkpoint().items() if k != "encoder"}
        return {**self.identity, "epoch": self.epoch, "world_size": len(ranks), "ranks": ranks,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "modules": modules, "resumed_at": self.resumed_at, "history": self.history}

    def save(self, directory: str, exported: Encoder, cfg: Mapping[str, Any], ranks: list[dict[str, Any]]) -> None:
        """Rank 0: write model.pt (+ model_full.pt), state.pt and, last, manifest.json into `directory`."""
        meta = {"method": self.identity["method"], "stage": self.identity["stage"], "epoch": self.epoch}
        stats = cfg["data"]["stats"]
        save_model(os.path.join(directory, MODEL_FILE), exported, cfg["model"], stats, meta)
        if exported is not self.method.encoder:
            save_model(os.path.join(directory, FULL_MODEL_FILE), self.method.encoder, cfg["model"], stats, meta)
        atomic_save(self.state_dict(ranks), os.path.join(directory, STATE_FILE))
        write_manifest(directory, epoch=self.epoch, config_hash=self.identity["config_hash"],
                       stage=self.identity["stage"])

    # ---------------------------------------------------------------------------------- restoring
    def load_state_dict(self, state: Mapping[str, Any], rank: int) -> None:
        modules = self.method.modules_to_checkpoint()
        for name, module_state in state["modules"].items():
            modules[name].load_state_dict(module_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # Each rank continues its own streams and statistics; with a different worker count, ranks
        # beyond the saved ones take the last saved rank's (the run continues, not bit-exactly).
        mine = state["ranks"][min(rank, len(state["ranks"]) - 1)]
        set_rng_state(mine["rng"])
        for name, module in modules.items():
            for key, value in mine["buffers"].get(name, {}).items():
                module.get_buffer(key).copy_(value)
        self.epoch = int(state["epoch"])
        self.resumed_at = [int(e) for e in state["resumed_at"]] + [self.epoch]
        self.history = [dict(r) for r in state["history"]]
        self.saved_world_size = int(state["world_size"])

    def restore(self, directory: str, device: torch.device, rank: int) -> str | None:
        """Load the checkpoint in `directory`; returns why it was refused (another run's) or None."""
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        problem = identity_mismatch(state, self.identity)
        if problem:
            return problem
        full = os.path.join(directory, FULL_MODEL_FILE)  # dual-BN methods export a single-BN model.pt
        blob = torch.load(full if os.path.exists(full) else os.path.join(directory, MODEL_FILE),
                          map_location=device, weights_only=True)
        self.method.encoder.load_state_dict(blob["encoder"])
        self.load_state_dict(state, rank)
        return None
