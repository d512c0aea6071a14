"""Per-layer linear probes on clean and adversarial data (Ghofrani et al.'s layer-wise analysis).

A probe is multinomial logistic regression on one layer's pooled features (standardised with the
training features' mean and std, L2-regularised, fitted full-batch with L-BFGS). For every layer:
- `clean`: probe fitted on clean training features, accuracy on clean test features;
- `adv`: the same probe on the test images' adversarial counterparts (how much of the
  attack's damage is already visible at that depth);
- `adv_trained` (optional): probe fitted on adversarial training features, accuracy on
  adversarial test features (how much robust, linearly decodable information the layer holds).
Adversarial examples come from the project's PGD engine against a given classifier
(`trainer.evaluation.robustness.clean_and_pgd_counts`), never from a second implementation.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn



class LinearProbe(nn.Module):
    """Standardise, then a linear layer; differentiable, so a probe on the last layer can be
    stacked on its encoder and attacked (`ProbedClassifier`)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())
        self.linear = nn.Linear(mean.numel(), num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear((h.flatten(1) - self.mean) / self.std)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight_decay: float = 1e-4, max_iter: int = 100, seed: int = 0) -> LinearProbe:
    """Fit a LinearProbe on features [n, d] (CPU or GPU) by full-batch L-BFGS on CE + wd/2 |W|^2."""
    features = features.flatten(1).float()
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    probe = LinearProbe(mean, std, num_classes).to(features.device)
    with torch.no_grad():
        w = torch.randn(probe.linear.weight.shape, generator=gen) * 0.01
        probe.linear.weight.copy_(w.to(features.device))
        probe.linear.bias.zero_()
    z = (features - probe.mean) / probe.std
    opt = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe.linear(z), labels) + 0.5 * weight_decay * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probe(features.float()).argmax(1) == labels).float().mean())


class ProbedClassifier(nn.Module):
    """encoder -> LinearProbe on its pooled output: a classifier to attack when none is given."""

    def __init__(self, encoder: nn.Module, probe: LinearProbe) -> None:
        super().__init__()
        self.encoder, self.probe = encoder, probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(self.encoder(x))


def layer_probes(train: Sequence[torch.Tensor], train_y: torch.Tensor, test: Sequence[torch.Tensor],
                 test_y: torch.Tensor, num_classes: int, test_adv: Sequence[torch.Tensor] | None = None,
                 train_adv: Sequence[torch.Tensor] | None = None, weight_decay: float = 1e-4,
                 max_iter: int = 100) -> dict[str, list[float]]:
    """Accuracies per layer: `clean`, `adv` (clean-fitted probe on adversarial test features) and
    `adv_trained` (probe fitted on adversarial training features); lists in layer order."""
    out: dict[str, list[float]] = {"clean": []}
    if test_adv is not None:
        out["adv"] = []
    if train_adv is not None and test_adv is not None:
        out["adv_trained"] = []
    for i, (f_tr, f_te) in enumerate(zip(train, test)):
        probe = fit_linear_probe(f_tr, train_y, num_classes, weight_decay, max_iter)
        out["clean"].append(probe_accuracy(probe, f_te, test_y))
        if test_adv is not None:
            out["adv"].append(probe_accuracy(probe, test_adv[i], test_y))
            if train_adv is not None:
                probe_adv = fit_linear_probe(train_adv[i], train_y, num_classes, weight_decay, max_iter)
                out["adv_trained"].append(probe_accuracy(probe_adv, test_adv[i], test_y))
    return out
