"""What every Ray Train worker sets up first: Ray Train's context, device, threads, seeds, DDP."""
from __future__ import annotations

import glob
import logging
import os
import random
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from trainer.distributed import WorkerContext
from trainer.models.sync_bn import convert_sync_batchnorm


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint upload at INFO; our epoch line says it all."""
    try:
        from ray.train.v2._internal.execution import context as train_context, storage as train_storage

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        logging.getLogger(train_storage.__name__).setLevel(logging.WARNING)
    except ImportError:  # other Ray versions: keep their logging as it is
        pass


def setup_worker(cfg: Mapping[str, Any]) -> WorkerContext:
    """This worker's rank, device and threads; seeds python / numpy / torch with seed + rank."""
    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    ctx = ray.train.get_context()
    threads = int(cfg["cluster"]["cpus_per_worker"])
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = int(cfg["seed"]) + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cfg["deterministic"]:
        deterministic_algorithms()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return WorkerContext(rank, world, device, threads)


def deterministic_algorithms() -> None:
    """`deterministic=true`: PyTorch's deterministic kernels (an op without one warns), cuDNN's
    deterministic convolutions, cuBLAS's fixed workspace (set before the first cuBLAS call)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True


def ddp_wrapper(cfg: Mapping[str, Any], ctx: WorkerContext) -> Callable[[nn.Module], nn.Module]:
    """How this run wraps a trainable module: optional synchronised BN, then DDP (Ray's prepare_model)."""
    import ray.train.torch

    def wrap(module: nn.Module) -> nn.Module:
        if cfg["cluster"]["sync_bn"] and ctx.world_size > 1:
            module = convert_sync_batchnorm(module, ctx.device)
        # BN running statistics stay per rank (rank 0's are checkpointed); with SyncBN they agree.
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})

    return wrap


CHECKPOINT_DIR_PREFIX = "rssl-ckpt-"
STALE_CHECKPOINT_DIR_S = 900.0


def new_checkpoint_dir() -> str:
    """A fresh local folder for one checkpoint (Ray copies it into the run's storage on report; the loop
    removes it after). Its name carries this process's pid: folders left behind by a process that no
    longer exists (a worker killed mid-write) are removed once they are 15 minutes old (old enough
    that no other container sharing /tmp can still be writing one under a pid that looks dead here)."""
    root = tempfile.gettempdir()
    for path in glob.glob(os.path.join(root, CHECKPOINT_DIR_PREFIX + "*")):
        match = re.match(rf"{CHECKPOINT_DIR_PREFIX}(\d+)-", os.path.basename(path))
        try:
            stale = match and not _alive(int(match.group(1))) and \
                time.time() - os.path.getmtime(path) > STALE_CHECKPOINT_DIR_S
        except OSError:  # removed meanwhile
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{CHECKPOINT_DIR_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
