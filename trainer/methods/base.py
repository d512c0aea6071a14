"""The method interface: which views it needs, its attack objective, its loss.

A method owns its trainable encoder (`self.encoder`) and any frozen helpers (a teacher).
The worker wraps the encoder for DDP with `parallelize`; the training forward goes through
`self.net` (the DDP wrapper, so gradients are all-reduced), attacks through `self.encoder`
(no parameter gradients are needed, so no DDP bookkeeping).

Speed knobs the worker applies through this interface (trainer/worker/step.py): `to_channels_last`,
`compile` (both cover frozen helpers such as DeACL's teacher) and `attack_mode` (eval/train
mode for the attack plus, with `freeze_params_in_attack`, no parameter autograd at all).
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from torch import nn

from trainer.attacks import frozen_parameters, merged_attack, network_mode, pgd_config
from trainer.models import Encoder, build_encoder

METHOD_REGISTRY: dict[str, type["Method"]] = {}


def register_method(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHOD_REGISTRY[name] = cls
        return cls

    return deco


class Method(abc.ABC):
    name: ClassVar[str] = "base"
    views: ClassVar[str] = "two_view"
    uses_dual_bn: ClassVar[bool] = False
    needs_projector: ClassVar[bool] = True

    def __init__(self, cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device) -> None:
        self.cfg = cfg
        self.mcfg = method_cfg
        self.device = device
        # The attack group's settings, with the method's own (`method.attack`, e.g. RoCL's 7 steps) on top.
        attack = merged_attack(cfg["attack"], method_cfg.get("attack"))
        self.attack = pgd_config(attack)
        # Contrastive attack objectives: negatives from every rank, so that N workers x B/N craft
        # the same adversarial examples as 1 worker x B (the references attack the whole batch).
        self.attack_gather = bool(attack["gather_negatives"])
        self.encoder: Encoder = build_encoder(cfg["model"], cfg["data"]["stats"],
                                              with_projector=self.needs_projector,
                                              dual_bn=self.uses_dual_bn,
                                              projector=method_cfg.get("projector")).to(device)
        self.net: nn.Module = self.encoder
        # auto: only under torch.compile, where the compiled backward would otherwise compute every
        # weight gradient (measured: 15% slower); eager autograd already skips weight-gradient
        # kernels for autograd.grad w.r.t. the input, and freezing measured no difference there.
        freeze = cfg["freeze_params_in_attack"]
        self.freeze_params_in_attack = bool(cfg["compile"]) if freeze == "auto" else bool(freeze)

    def parallelize(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.net = wrap(self.encoder)

    def inference_modules(self) -> list[nn.Module]:
        """Every network a training step runs (the encoder and any frozen helper)."""
        return [self.encoder]

    def to_channels_last(self) -> None:
        for m in self.inference_modules():
            m.to(memory_format=torch.channels_last)

    def compile(self, **kwargs: Any) -> None:
        """torch.compile every network in place (state_dict keys unchanged), before `parallelize`."""
        for m in self.inference_modules():
            m.compile(**kwargs)

    @contextlib.contextmanager
    def attack_mode(self, train: bool = False) -> Iterator[None]:
        """The encoder's state while an attack runs: train/eval mode as the paper says, and its
        parameters out of autograd (restored afterwards) when freeze_params_in_attack is on."""
        with network_mode([self.encoder], train=train), \
                frozen_parameters([self.encoder], enabled=self.freeze_params_in_attack):
            yield

    def modules_to_checkpoint(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def train(self) -> None:
        self.encoder.train()

    @abc.abstractmethod
    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (loss to backpropagate, metrics as detached 0-d tensors — no host syncs)."""

    def export_encoder(self) -> Encoder:
        """The single-BN encoder that evaluation and fine-tuning use."""
        return self.encoder


def build_method(cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device,
                 **kwargs: Any) -> Method:
    name = method_cfg["name"]
    if name not in METHOD_REGISTRY:
        raise ValueError(f"method.name={name!r} is not known; allowed: {', '.join(sorted(METHOD_REGISTRY))}")
    return METHOD_REGISTRY[name](cfg, method_cfg, device, **kwargs)
