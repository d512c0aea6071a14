"""What runs inside a Ray Train worker: the pre-training loop over a TrainState with epoch hooks,
the evaluation loop, the training step and the worker's set-up. The driver side (starting Ray,
launching a TorchTrainer) is trainer/launch.py.

Names load on first use: the step (`TrainStep`, `prepare_method`) then imports without FFCV or
Ray, which the loops need (benchmarks/gpu_check.py runs the step where FFCV cannot be built)."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_MODULE_OF = {"EpochHook": "hooks", "NonFiniteLossError": "outcome", "RunMismatchError": "outcome",
              "TrainState": "state", "TrainStep": "step", "evaluate_loop": "evaluate",
              "prepare_method": "step", "pretrain_loop": "pretrain"}

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from trainer.worker.evaluate import evaluate_loop
    from trainer.worker.hooks import EpochHook
    from trainer.worker.outcome import NonFiniteLossError, RunMismatchError
    from trainer.worker.pretrain import pretrain_loop
    from trainer.worker.state import TrainState
    from trainer.worker.step import TrainStep, prepare_method


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'trainer.worker' has no attribute {name!r}")
    value = getattr(import_module(f"trainer.worker.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
