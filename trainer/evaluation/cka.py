"""Linear CKA (Kornblith et al. 2019) between layer representations, as Ghofrani et al. use it.

Three comparisons, all on the same n input images (rows must correspond):
- within a model: every layer against every other layer (clean inputs);
- clean vs adversarial: layer i on clean inputs against layer j on their adversarial
  counterparts (the diagonal is "same layer, clean vs adversarial");
- across two models: layer i of model A against layer j of model B.

Linear CKA(X, Y) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F) with K = X X^T, L = Y Y^T and Kc, Lc
the doubly centred Gram matrices; the debiased variant uses the unbiased HSIC estimator
(Song et al. 2012; Nguyen et al. 2021), as in the reference code. Computed in float64.
It is invariant to orthogonal transforms and isotropic scaling of the features, not to
arbitrary invertible linear maps.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("flatten", "avg")


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix X X^T (float64) of features [n, d] (higher-rank inputs are flattened)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return x @ x.t()


def center_gram(gram: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Doubly centre a Gram matrix; `unbiased` gives the U-statistic form (zero diagonal)."""
    gram = gram.to(torch.float64).clone()
    n = gram.shape[0]
    if unbiased:
        if n < 4:
            raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
        gram.fill_diagonal_(0)
        means = gram.sum(0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
        gram = gram - means[:, None] - means[None, :]
        gram.fill_diagonal_(0)
    else:
        means = gram.mean(0)
        means = means - means.mean() / 2
        gram = gram - means[:, None] - means[None, :]
    return gram


def cka(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> float:
    """CKA between two (uncentred) Gram matrices of the same n examples."""
    kx, ky = center_gram(gram_x, debiased), center_gram(gram_y, debiased)
    denom = kx.norm() * ky.norm()
    if denom == 0:
        return float("nan")
    return float((kx * ky).sum() / denom)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA between feature matrices x [n, d1] and y [n, d2] (rows = the same examples)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples in both: {x.shape[0]} vs {y.shape[0]} rows")
    return cka(gram_linear(x), gram_linear(y), debiased)


def _centred_normalised(grams: Sequence[torch.Tensor], debiased: bool) -> list[torch.Tensor]:
    out = []
    for g in grams:
        c = center_gram(g, debiased)
        norm = c.norm()
        out.append(c / norm if norm > 0 else torch.full_like(c, float("nan")))
    return out


def cka_matrix(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor] | None = None,
               debiased: bool = False) -> np.ndarray:
    """CKA of every layer of `feats_a` against every layer of `feats_b` (default: `feats_a`).

    Each Gram matrix is centred and normalised once, so an L_a x L_b matrix costs L_a + L_b
    Gram matrices plus L_a * L_b inner products of n x n matrices.
    """
    ca = _centred_normalised([gram_linear(f) for f in feats_a], debiased)
    cb = ca if feats_b is None else _centred_normalised([gram_linear(f) for f in feats_b], debiased)
    out = np.zeros((len(ca), len(cb)))
    for i, a in enumerate(ca):
        for j, b in enumerate(cb):
            if a.shape != b.shape:
                raise ValueError("CKA needs the same examples in both feature sets")
            out[i, j] = float((a * b).sum())
    return out


def pool_features(t: torch.Tensor, pooling: str = "flatten") -> torch.Tensor:
    """[B, C, H, W] -> [B, C*H*W] ('flatten') or [B, C] ('avg'); [B, D] stays as it is."""
    if t.dim() == 2:
        return t
    if pooling == "flatten":
        return t.flatten(1)
    if pooling == "avg":
        return F.adaptive_avg_pool2d(t, 1).flatten(1)
    raise ValueError(f"pooling={pooling!r} is not known; allowed: {', '.join(POOLINGS)}")


def layer_names(n_layers: int) -> list[str]:
    """Names of `Encoder.layer_features` outputs: stem, layer1..layer{n-2}, pool."""
    return ["stem"] + [f"layer{i}" for i in range(1, n_layers - 1)] + ["pool"]


@torch.no_grad()
def collect_layer_features(encoder: nn.Module, x: torch.Tensor, pooling: str = "flatten",
                           batch_size: int = 256, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Pooled per-layer features (CPU, float32) of images x [n, 3, H, W] in [0, 1], eval mode."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was = encoder.training
    encoder.eval()
    per_layer: list[list[torch.Tensor]] = []
    try:
        for xb in x.split(batch_size):
            outs = encoder.layer_features(xb.to(device).contiguous())
            if not per_layer:
                per_layer = [[] for _ in outs]
            for store, o in zip(per_layer, outs):
                store.append(pool_features(o, pooling).float().cpu())
    finally:
        encoder.train(was)
    return [torch.cat(store) for store in per_layer]
