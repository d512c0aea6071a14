"""Feature extraction and kNN accuracy (the cheap monitor during pre-training)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.distributed import gather_plain


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: Iterable, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of every batch (eval mode); gathered across ranks if asked."""
    was = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in loader:
        feats.append(encoder(batch["views"][0]).float())
        labels.append(batch["label"])
    encoder.train(was)
    f, y = torch.cat(feats), torch.cat(labels)
    if gather:
        f, y = gather_plain(f), gather_plain(y)
    return f, y


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.1, num_classes: int | None = None) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018), as SSL papers monitor."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, train_f.shape[0])
    correct = 0
    for chunk_f, chunk_y in zip(test_f.split(1024), test_y.split(1024)):
        sim = chunk_f @ train_f.t()
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(chunk_f.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (w / temperature).exp())
        correct += (votes.argmax(1) == chunk_y).sum().item()
    return correct / max(1, test_y.shape[0])
