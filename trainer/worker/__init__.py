"""What runs inside a Ray Train worker: the pre-training loop over a TrainState with epoch hooks,
the evaluation loop, the training step and the worker's set-up. The driver side (starting Ray,
launching a TorchTrainer) is trainer/launch.py."""
from trainer.worker.evaluate import evaluate_loop
from trainer.worker.hooks import EpochHook
from trainer.worker.outcome import NonFiniteLossError, RunMismatchError
from trainer.worker.pretrain import pretrain_loop
from trainer.worker.state import TrainState
from trainer.worker.step import TrainStep, prepare_method

__all__ = ["EpochHook", "NonFiniteLossError", "RunMismatchError", "TrainState", "TrainStep", "evaluate_loop",
           "prepare_method", "pretrain_loop"]
