"""Shared fixtures: the repo root on sys.path, tiny configs, a Ray instance per test module."""
from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# and a worker's `ray.train.report` waits for that poll (its result queue holds one): every epoch of
# a tiny test run took 2 s, its training 0.2 s. The tests poll 4x as often (Ray and its subprocesses
# inherit this); the one whose claim is about the default poll (test_random_sigkills_...) pins it.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_DEFAULT_TRAIN_POLL_S = "2.0"
os.environ.setdefault(TRAIN_POLL_ENV, "0.5")

# Tests run on 2 shared cores: one intra-op thread per process avoids oversubscription.
import torch  # noqa: E402

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]) -> dict:
    from conf import compose

    return compose(list(overrides))


def composed(*overrides: str) -> dict:
    """The validated config for these overrides (a fresh copy; compositions are cached)."""
    return copy.deepcopy(_composed(tuple(overrides)))


TINY_MODEL = ("model.width=4", "model.proj_hidden_dim=32", "model.proj_output_dim=16")


@pytest.fixture
def one_torch_thread():
    """Tests on 2 shared cores: oversubscribed torch threads are far slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_overrides(tmp_path: Path, **extra: str) -> list[str]:
    """Overrides that make any recipe run in seconds on CPU (tiny widths, few epochs)."""
    base = {
        "output_dir": str(tmp_path / "out"),
        "data.beton_dir": str(tmp_path / "data"),
        "model.width": "4",
        "model.proj_hidden_dim": "32",
        "model.proj_output_dim": "16",
        "teacher.method.train.epochs": "1",
        "teacher.method.train.warmup_epochs": "0",
        "method.train.epochs": "1",
        "method.train.warmup_epochs": "0",
        "eval.linear.epochs": "1",
        "eval.linear.milestones": "[1]",
        "eval.autoattack.n_examples": "8",
        "eval.curve.eps": "[]",  # the demo's robustness curve: only where a test checks it
        "eval.pgd.steps": "2",
        "monitor.knn_every": "0",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def ray_local():
    """A fresh in-process Ray per test module. One long-lived driver across the whole suite was
    seen to stop receiving actor-state updates from the GCS (a Train controller stayed
    PENDING_CREATION on the driver while the GCS had it ALIVE), hanging the next `fit()`."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray()
    yield ray
    ray.shutdown()


def start_local_ray() -> None:
    """ray_local's Ray (also for a test that must shut it down for a while, then give it back)."""
    import ray

    from trainer.launch import local_runtime_env

    ray.init(address="local", num_cpus=3, log_to_driver=True, runtime_env=local_runtime_env())
