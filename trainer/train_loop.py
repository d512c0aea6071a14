"""The Ray Train worker loop for pre-training stages (any method in the registry).

Per rank: FFCV loader for its shard -> method (encoder wrapped for DDP, optional SyncBN) ->
epochs of steps, then per epoch: metrics all-reduced, kNN monitor, checkpoint from rank 0,
`ray.train.report`. Resumes from `ray.train.get_checkpoint()` (model and every other module of
the method, optimiser, schedule, every rank's RNG streams, loader epoch) after checking that the
checkpoint belongs to this config and stage.

The function returns a status dict on rank 0 (Ray's `Result.return_value`): "completed",
"nonfinite" (a non-finite loss: the run stops without retries, keeping the last good checkpoint)
or "mismatch" (the checkpoint Ray resumed belongs to another config). `recipes.run_train_stage`
turns the last two into exceptions in the driver.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any, Mapping

import torch

from data_pipeline.loaders import build_loader
from data_pipeline.write import beton_path
from trainer.checkpoint import MODEL_FILE, STATE_FILE, atomic_save, rng_state, save_model, set_rng_state
from trainer.config import config_hash
from trainer.evaluation.features import extract_features, knn_accuracy
from trainer.evaluation.monitor import build_val_monitor
from trainer.methods import build_method
from trainer.optim import build_optimizer, build_scheduler
from trainer.runtime import (Progress, all_reduce_mean, convert_sync_batchnorm, inject_nonfinite,
                             maybe_inject_failure, new_checkpoint_dir, setup_worker)
from trainer.step import TrainStep, prepare_method


FULL_MODEL_FILE = "model_full.pt"


CHECKPOINT_FORMAT = 2


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the run stopped and kept its last good checkpoint."""


class RunMismatchError(RuntimeError):
    """A run folder / checkpoint belongs to a different config (or stage) than this job's."""


def _wrap_ddp(cfg: Mapping[str, Any], device: torch.device, world_size: int):
    import ray.train.torch

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if cfg["cluster"].get("sync_bn") and world_size > 1:
            module = convert_sync_batchnorm(module, device)
        # BN running statistics stay per rank (rank 0's are checkpointed); with SyncBN they agree.
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})

    return wrap


def _replay_unseen_reports(stage: Mapping[str, Any], history: list[dict[str, float]], done_epochs: int,
                           checkpoint: Any) -> None:
    """Report again the epochs the consumer of this run's reports has not seen.

    A Tune sweep interrupted while a trial's Train run is between its report and the driver's
    bookkeeping can restore a trial whose Train checkpoint is ahead of the trial's results (or
    already final: then nothing would be reported at all). The sweep passes the last epoch it
    recorded per trial (`stage.reported_epochs`); those after it are replayed from the
    checkpoint's history, the last one with the checkpoint's path, so every epoch reaches Tune
    exactly once. Without the key (plain runs, Train-level retries) nothing is replayed.
    """
    import ray.train

    seen = stage.get("reported_epochs")
    if seen is None:
        return
    unseen = [r for r in history if int(seen) < int(r.get("epoch", 0)) <= done_epochs]
    for i, r in enumerate(unseen):
        metrics = dict(r)
        if i == len(unseen) - 1:
            metrics["checkpoint_path"] = checkpoint.path
        ray.train.report(metrics)


def _checkpoint_identity(cfg: Mapping[str, Any], stage: Mapping[str, Any]) -> dict[str, Any]:
    from trainer.recipes import resolve_recipe

    return {"config_hash": config_hash(cfg), "run_name": cfg.get("run_name"),
            "recipe": resolve_recipe(cfg), "stage": stage["name"], "method": stage["method"]["name"]}


def _identity_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    for key in ("config_hash", "stage", "method"):
        if key in saved and saved[key] != expected[key]:
            return (f"the checkpoint Ray resumed for run '{expected['run_name']}' stage '{expected['stage']}' "
                    f"has {key}={saved[key]!r} but this job has {key}={expected[key]!r}: it belongs to "
                    "another configuration. Use a different run_name (or leave run_name unset: it is "
                    "derived from the config hash), or delete that run's folder in the storage path.")
    return None


def pretrain_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Entry of one pre-training stage on every worker. config = {"cfg", "stage"}."""
    import ray.train

    cfg, stage = config["cfg"], config["stage"]
    mcfg, tcfg = stage["method"], stage["method"]["train"]
    ctx = setup_worker(cfg)
    per_rank_batch = int(tcfg["batch_size"]) // ctx.world_size

    method = build_method(cfg, mcfg, ctx.device, **stage.get("method_kwargs", {}))
    # channels_last / torch.compile / DDP, in that order (trainer/step.py)
    prepare_method(method, cfg, ctx.device, wrap=_wrap_ddp(cfg, ctx.device, ctx.world_size),
                   log=print if ctx.is_main else lambda _: None)

    data = cfg["data"]
    loader = build_loader(str(beton_path(data, "train")), method.views, per_rank_batch, ctx.device,
                          ctx.num_threads, train=True, seed=int(cfg["seed"]), distributed=ctx.distributed,
                          augment=data.get("augment"))
    steps = len(loader)
    optimizer = build_optimizer(method.encoder.parameters(), tcfg)
    scheduler = build_scheduler(optimizer, tcfg, steps)
    epochs, start_epoch = int(tcfg["epochs"]), 0
    identity = _checkpoint_identity(cfg, stage)
    generators = {"loader": loader.generator}  # the device colour-augmentation stream
    resumed_at: list[int] = []
    history: list[dict[str, float]] = []  # every epoch's report, kept in the checkpoint (replay below)

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            problem = _identity_mismatch(state, identity)
            if problem:  # every rank reads the same checkpoint, so every rank stops here
                if ctx.is_main:
                    print(f"[{stage['name']}] {problem}", flush=True)
                return {"status": "mismatch", "message": problem}
            full = os.path.join(d, FULL_MODEL_FILE)  # dual-BN methods export a single-BN model.pt
            blob = torch.load(full if os.path.exists(full) else os.path.join(d, MODEL_FILE),
                              map_location=ctx.device, weights_only=True)
        method.encoder.load_state_dict(blob["encoder"])
        modules = method.modules_to_checkpoint()
        for name, module_state in state.get("modules", {}).items():
            modules[name].load_state_dict(module_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # Each rank continues its own streams; with a different worker count, ranks beyond the
        # saved ones reuse the last saved state (the run continues, not bit-exactly).
        set_rng_state(state["rng"][min(ctx.rank, len(state["rng"]) - 1)], generators)
        start_epoch = int(state["epoch"]) + 1
        resumed_at = [int(e) for e in state.get("resumed_at", [])] + [start_epoch]
        history = [dict(r) for r in state.get("history", [])]
        if ctx.is_main:
            print(f"[{stage['name']}] resumed after epoch {start_epoch} from its checkpoint "
                  f"(written by {int(state.get('world_size', 1))} worker(s); now {ctx.world_size})", flush=True)
        _replay_unseen_reports(stage, history, start_epoch, ckpt)

    knn_every = int(cfg.get("monitor", {}).get("knn_every", 1))
    monitor_split = "val" if "val" in data["splits"] else "test"
    eval_loaders = None
    if knn_every > 0:
        eval_loaders = tuple(build_loader(str(beton_path(data, s)), "eval", per_rank_batch, ctx.device,
                                          ctx.num_threads, train=False, distributed=ctx.distributed,
                                          drop_last=False) for s in ("train", monitor_split))
    val_monitor = build_val_monitor(cfg, per_rank_batch, ctx)  # linear probe + PGD on val (Tune's metric)

    progress = Progress(stage["name"], epochs, start_epoch, ctx.is_main)
    train_step = TrainStep(method, optimizer, scheduler, cfg, ctx.device)  # no host sync inside
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        method.train()
        t0 = time.time()
        sums: dict[str, torch.Tensor] = {}
        n_images = 0
        train_step.poison_loss = inject_nonfinite(cfg, epoch)  # debug hook (tests)
        for step, batch in enumerate(loader):
            maybe_inject_failure(cfg, ctx, epoch, step, steps)
            metrics = train_step(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float()
            n_images += batch["views"][0].shape[0]
        seconds = time.time() - t0
        report = all_reduce_mean({k: v / max(steps, 1) for k, v in sums.items()}, ctx)
        if not all(math.isfinite(v) for v in report.values()):
            # Metrics are all-reduced, so every rank takes this branch at the same epoch. Stop
            # without a checkpoint (and without raising: Ray would retry it max_failures times).
            message = (f"[{stage['name']}] non-finite training metrics at epoch {epoch + 1}: {report}; "
                       f"stopped. The last good checkpoint (epoch {epoch}) is kept"
                       + ("" if epoch else " (none: it failed in the first epoch)")
                       + "; lower the learning rate or check the data.")
            if ctx.is_main:
                print(message, flush=True)
            return {"status": "nonfinite", "message": message, "epoch": epoch + 1}
        report.update(epoch=epoch + 1, lr=scheduler.get_last_lr()[0], epoch_time_s=seconds,
                      images_per_s=n_images * ctx.world_size / max(seconds, 1e-9))
        if eval_loaders and ((epoch + 1) % knn_every == 0 or epoch + 1 == epochs):
            trf, trl = extract_features(method.encoder, eval_loaders[0])
            tef, tel = extract_features(method.encoder, eval_loaders[1])
            report[f"knn_{monitor_split}_acc"] = knn_accuracy(trf, trl, tef, tel, num_classes=data["num_classes"])
        if val_monitor is not None and val_monitor.due(epoch + 1, epochs):
            report.update(val_monitor(method.export_encoder()))
        progress.epoch_line(epoch, n_images * ctx.world_size, seconds, report)

        checkpoint_dir = None
        if ctx.is_main:
            checkpoint_dir = new_checkpoint_dir()
            save_model(os.path.join(checkpoint_dir, MODEL_FILE), method.export_encoder(), cfg["model"],
                       data["stats"], {"method": mcfg["name"], "stage": stage["name"], "epoch": epoch + 1})
            if method.export_encoder() is not method.encoder:
                save_model(os.path.join(checkpoint_dir, FULL_MODEL_FILE), method.encoder, cfg["model"],
                           data["stats"], {"method": mcfg["name"], "stage": stage["name"]})
        # Every rank saves its RNG state so a resumed run continues each rank's stream.
        rngs = [rng_state(generators)]
        if ctx.distributed:
            gathered: list[Any] = [None] * ctx.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if ctx.is_main:
            extra = {k: m.state_dict() for k, m in method.modules_to_checkpoint().items() if k != "encoder"}
            history.append({k: v for k, v in report.items() if isinstance(v, (int, float))})
            atomic_save({"format": CHECKPOINT_FORMAT, **identity, "epoch": epoch, "loader_epoch": epoch + 1,
                         "world_size": ctx.world_size, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "modules": extra, "rng": rngs,
                         "resumed_at": resumed_at, "history": history, "grad_scaler": None},  # bf16/fp32: no scaler
                        os.path.join(checkpoint_dir, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
        else:
            checkpoint = None
        ray.train.report(report, checkpoint=checkpoint)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"status": "completed", "epochs": epochs, "resumed_at": resumed_at}
