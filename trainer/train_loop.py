"""The Ray Train worker loop for pre-training stages (any method in the registry).

Per rank: FFCV loader for its shard -> method (encoder wrapped for DDP) -> epochs of steps,
then per epoch: metrics all-reduced, kNN monitor, checkpoint from rank 0, `ray.train.report`.
Resumes from `ray.train.get_checkpoint()` exactly (model, optimiser, schedule, RNG, loader epoch).
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
from trainer.evaluation.features import extract_features, knn_accuracy
from trainer.methods import build_method
from trainer.optim import build_optimizer, build_scheduler
from trainer.runtime import Progress, all_reduce_mean, new_checkpoint_dir, setup_worker
from trainer.step import TrainStep, prepare_method


FULL_MODEL_FILE = "model_full.pt"


class NonFiniteLossError(RuntimeError):
    pass


def _wrap_ddp(cfg: Mapping[str, Any]):
    import ray.train.torch

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if cfg["cluster"].get("sync_bn") and int(cfg["cluster"]["num_workers"]) > 1:
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})

    return wrap


def pretrain_loop(config: dict[str, Any]) -> None:
    """Entry of one pre-training stage on every worker. config = {"cfg", "stage"}."""
    import ray.train

    cfg, stage = config["cfg"], config["stage"]
    mcfg, tcfg = stage["method"], stage["method"]["train"]
    ctx = setup_worker(cfg)
    per_rank_batch = int(tcfg["batch_size"]) // ctx.world_size

    method = build_method(cfg, mcfg, ctx.device, **stage.get("method_kwargs", {}))
    # channels_last / torch.compile / DDP, in that order (trainer/step.py)
    prepare_method(method, cfg, ctx.device, wrap=_wrap_ddp(cfg), log=print if ctx.is_main else lambda _: None)

    data = cfg["data"]
    loader = build_loader(str(beton_path(data, "train")), method.views, per_rank_batch, ctx.device,
                          ctx.num_threads, train=True, seed=int(cfg["seed"]), distributed=ctx.distributed,
                          augment=data.get("augment"))
    steps = len(loader)
    optimizer = build_optimizer(method.encoder.parameters(), tcfg)
    scheduler = build_scheduler(optimizer, tcfg, steps)
    epochs, start_epoch = int(tcfg["epochs"]), 0

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            full = os.path.join(d, FULL_MODEL_FILE)  # dual-BN methods export a single-BN model.pt
            blob = torch.load(full if os.path.exists(full) else os.path.join(d, MODEL_FILE),
                              map_location=ctx.device, weights_only=True)
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        method.encoder.load_state_dict(blob["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][min(ctx.rank, len(state["rng"]) - 1)])
        start_epoch = int(state["epoch"]) + 1
        if ctx.is_main:
            print(f"[{stage['name']}] resumed from epoch {start_epoch}", flush=True)

    knn_every = int(cfg.get("monitor", {}).get("knn_every", 1))
    monitor_split = "val" if "val" in data["splits"] else "test"
    eval_loaders = None
    if knn_every > 0:
        eval_loaders = tuple(build_loader(str(beton_path(data, s)), "eval", per_rank_batch, ctx.device,
                                          ctx.num_threads, train=False, distributed=ctx.distributed,
                                          drop_last=False) for s in ("train", monitor_split))

    progress = Progress(stage["name"], epochs, start_epoch, ctx.is_main)
    train_step = TrainStep(method, optimizer, scheduler, cfg, ctx.device)  # no host sync inside
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        method.train()
        t0 = time.time()
        sums: dict[str, torch.Tensor] = {}
        n_images = 0
        for batch in loader:
            metrics = train_step(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float()
            n_images += batch["views"][0].shape[0]
        seconds = time.time() - t0
        report = all_reduce_mean({k: v / max(steps, 1) for k, v in sums.items()}, ctx)
        if not all(math.isfinite(v) for v in report.values()):
            raise NonFiniteLossError(
                f"[{stage['name']}] non-finite training metrics at epoch {epoch + 1}: {report}; "
                "stopping. The last good checkpoint (previous epoch) is kept; lower the learning rate "
                "or check the data")
        report.update(epoch=epoch + 1, lr=scheduler.get_last_lr()[0], epoch_time_s=seconds,
                      images_per_s=n_images * ctx.world_size / max(seconds, 1e-9))
        if eval_loaders and ((epoch + 1) % knn_every == 0 or epoch + 1 == epochs):
            trf, trl = extract_features(method.encoder, eval_loaders[0])
            tef, tel = extract_features(method.encoder, eval_loaders[1])
            report[f"knn_{monitor_split}_acc"] = knn_accuracy(trf, trl, tef, tel, num_classes=data["num_classes"])
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
        rngs = [rng_state()]
        if ctx.distributed:
            gathered: list[Any] = [None] * ctx.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if ctx.is_main:
            atomic_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch, "rng": rngs, "stage": stage["name"]},
                        os.path.join(checkpoint_dir, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
        else:
            checkpoint = None
        ray.train.report(report, checkpoint=checkpoint)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
