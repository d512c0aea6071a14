"""The Ray Train worker loop of a pre-training stage (any method in the registry).

Per rank: the method (channels_last / compile / DDP), its FFCV loader shard and a TrainState that
resumes from `ray.train.get_checkpoint()`; then per epoch: train, all-reduce the metrics, run the
hooks (monitors), checkpoint from rank 0, `ray.train.report`. The stage payload (`config["stage"]`,
built by trainer.recipes.stage_payload) names the stage, its method config, the method's extra
arguments (DeACL's teacher) and the identity its checkpoints carry.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any, Mapping, Sequence

from data_pipeline.loaders import build_loader
from data_pipeline.write import beton_path
from trainer.distributed import WorkerContext, all_reduce_mean
from trainer.methods import build_method
from trainer.models import Encoder
from trainer.optim import build_optimizer, build_scheduler
from trainer.progress import Progress
import trainer.worker.outcome as outcome
from trainer.worker.context import ddp_wrapper, new_checkpoint_dir, setup_worker
from trainer.worker.hooks import EpochHook, default_hooks
from trainer.worker.resume import atomic_upload, resume_checkpoint
from trainer.worker.state import TrainState
from trainer.worker.stop import StopRequest
from trainer.worker.step import TrainStep, prepare_method


def pretrain_loop(config: dict[str, Any], extra_hooks: Sequence[EpochHook] = ()) -> dict[str, Any]:
    """Entry of one pre-training stage on every worker. config = {"cfg": ..., "stage": ...}."""
    cfg, stage = config["cfg"], config["stage"]
    ctx = setup_worker(cfg)
    state, train_step = build_state(cfg, stage, ctx)
    # Ray's latest checkpoint if it verifies, else the newest older one that does (trainer/worker/resume.py)
    checkpoint = resume_checkpoint(ctx, lambda line: _say(ctx, f"[{stage['name']}] {line}"))
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            problem = state.restore(d, ctx.device, ctx.rank)
        if problem:  # every rank reads the same checkpoint, so every rank stops here
            _say(ctx, f"[{stage['name']}] {problem}")
            return outcome.mismatch(problem)
        _say(ctx, f"[{stage['name']}] resumed after epoch {state.epoch} from its checkpoint "
                  f"(written by {state.saved_world_size} worker(s); now {ctx.world_size})")
        replay_unseen_reports(stage, state, checkpoint)
    epochs = int(stage["method"]["train"]["epochs"])
    per_rank_batch = int(stage["method"]["train"]["batch_size"]) // ctx.world_size
    hooks = default_hooks(cfg, ctx, train_step, per_rank_batch, epochs) + list(extra_hooks)
    progress = Progress(stage["name"], epochs, state.epoch, ctx.is_main)
    stop = StopRequest(stage.get("stop_file"), ctx)
    while state.epoch < epochs:
        epoch = state.epoch
        done = None if stop.requested() else train_epoch(state, train_step, hooks, ctx, stop)
        if done is None:  # the driver got a signal: end after the last report (Ray registers its checkpoint)
            _say(ctx, f"[{stage['name']}] stop requested: stopping after epoch {epoch}")
            return outcome.interrupted(epoch)
        report, timings = done
        if not all(math.isfinite(v) for v in report.values()):
            return _stop_nonfinite(stage, epoch, report, ctx)
        encoder = state.method.export_encoder()  # once per epoch: monitors and checkpoint share it
        timings["hooks_s"] = {}
        for hook in hooks:
            t = time.perf_counter()
            report.update(hook.after_epoch(epoch, encoder))
            timings["hooks_s"][hook.name] = time.perf_counter() - t
        progress.epoch_line(epoch, timings["images"], timings["step_loop_s"], report)
        timings.update(report_epoch(cfg, state, encoder, report, ctx))
        for hook in hooks:
            hook.after_report(epoch, report, timings)
    return outcome.completed(epochs=epochs, resumed_at=state.resumed_at)


def build_state(cfg: Mapping[str, Any], stage: Mapping[str, Any],
                ctx: WorkerContext) -> tuple[TrainState, TrainStep]:
    """The method (prepared for this device and wrapped for DDP), its loader shard, optimiser and schedule."""
    mcfg, tcfg = stage["method"], stage["method"]["train"]
    method = build_method(cfg, mcfg, ctx.device, **stage["method_kwargs"])
    # channels_last / torch.compile / DDP, in that order (trainer/worker/step.py)
    prepare_method(method, cfg, ctx.device, wrap=ddp_wrapper(cfg, ctx), log=print if ctx.is_main else lambda _: None)
    data = cfg["data"]
    loader = build_loader(str(beton_path(data, "train")), method.views, int(tcfg["batch_size"]) // ctx.world_size,
                          ctx.device, ctx.num_threads, train=True, seed=int(cfg["seed"]),
                          distributed=ctx.distributed, augment=data["augment"])
    optimizer = build_optimizer(method.encoder.parameters(), tcfg)
    scheduler = build_scheduler(optimizer, tcfg, len(loader))
    state = TrainState(method, optimizer, scheduler, loader, dict(stage["identity"]))
    return state, TrainStep(method, optimizer, scheduler, cfg, ctx.device)  # no host sync inside a step


def train_epoch(state: TrainState, train_step: TrainStep, hooks: Sequence[EpochHook], ctx: WorkerContext,
                stop: StopRequest | None = None) -> tuple[dict[str, float], dict[str, Any]] | None:
    """One epoch of steps; (the all-reduced report, where the time went), or None when `stop` was
    requested after one of its steps (the epoch is abandoned; its last checkpoint stays the resume point)."""
    epoch, loader = state.epoch, state.loader
    loader.set_epoch(epoch)
    state.method.train()
    for hook in hooks:
        hook.before_epoch(epoch)
    steps, sums, n_images, wait = len(loader), {}, 0, 0.0
    t0 = tick = time.perf_counter()
    for step, batch in enumerate(loader):
        wait += time.perf_counter() - tick
        for hook in hooks:
            hook.on_step(epoch, step, steps)
        for k, v in train_step(batch).items():
            sums[k] = sums.get(k, 0) + v.float()
        n_images += batch["views"][0].shape[0]
        if stop is not None and stop.requested():
            return None
        tick = time.perf_counter()
    seconds = time.perf_counter() - t0
    report = all_reduce_mean({k: v / max(steps, 1) for k, v in sums.items()}, ctx)
    report.update(epoch=epoch + 1, lr=state.scheduler.get_last_lr()[0], epoch_time_s=seconds,
                  images_per_s=n_images * ctx.world_size / max(seconds, 1e-9),
                  # cumulative images x (1 + training PGD steps): Tune's `time_attr=compute` budget
                  compute=(state.history[-1].get("compute", 0) if state.history else 0)
                  + n_images * ctx.world_size * (1 + state.method.attack.steps))
    return report, {"step_loop_s": seconds, "data_wait_s": wait, "images": n_images * ctx.world_size}


def report_epoch(cfg: Mapping[str, Any], state: TrainState, encoder: Encoder, report: dict[str, Any],
                 ctx: WorkerContext) -> dict[str, float]:
    """Checkpoint (rank 0 writes it, every rank's own state is in it, manifest last) and `ray.train.report`
    (uploading it atomically); their seconds."""
    import ray.train

    t, slow = time.perf_counter(), float(cfg["cluster"]["debug"]["slow_checkpoint_write_s"])
    ranks = state.gather_ranks(ctx)  # a collective: every rank's RNG and BN statistics, before rank 0 writes
    state.end_epoch(report)
    directory = None
    if ctx.is_main:
        directory = new_checkpoint_dir()
        state.save(directory, encoder, cfg, ranks)
        if slow:  # fault tests: as if each file took `slow` seconds to write (locally, then into storage)
            time.sleep(slow * len(os.listdir(directory)))
    written = time.perf_counter()
    # atomic into storage (local or remote): no half-copied checkpoint_* folder verifies
    upload = {"checkpoint_upload_fn": atomic_upload(slow)} if directory else {}
    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None,
                     **upload)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
    return {"checkpoint_write_s": written - t, "report_s": time.perf_counter() - written}


def replay_unseen_reports(stage: Mapping[str, Any], state: TrainState, checkpoint: Any) -> None:
    """Report again the epochs the consumer of this run's reports has not seen.

    A Tune sweep interrupted while a trial's Train run is between its report and the driver's
    bookkeeping can restore a trial whose Train checkpoint is ahead of the trial's results (or
    already final: then nothing would be reported at all). The sweep passes the last epoch it
    recorded per trial (`stage["reported_epochs"]`); those after it are replayed from the
    checkpoint's history, the last one with the checkpoint's path, so every epoch reaches Tune
    exactly once. Without the key (plain runs, Train-level retries) nothing is replayed.
    """
    import ray.train

    seen = stage.get("reported_epochs")
    if seen is None:
        return
    unseen = [r for r in state.history if int(seen) < int(r.get("epoch", 0)) <= state.epoch]
    for i, r in enumerate(unseen):
        ray.train.report({**r, **({"checkpoint_path": checkpoint.path} if i == len(unseen) - 1 else {})})


def _stop_nonfinite(stage: Mapping[str, Any], epoch: int, report: Mapping[str, float],
                    ctx: WorkerContext) -> dict[str, Any]:
    # Metrics are all-reduced, so every rank stops at the same epoch, without a checkpoint (and
    # without raising: Ray would retry it max_failures times).
    message = (f"[{stage['name']}] non-finite training metrics at epoch {epoch + 1}: {dict(report)}; stopped. "
               f"The last good checkpoint (epoch {epoch}) is kept" + ("" if epoch else " (none: it failed in "
               "the first epoch)") + "; lower the learning rate or check the data.")
    _say(ctx, message)
    return outcome.nonfinite(message, epoch + 1)


def _say(ctx: WorkerContext, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)

