"""Losses as pure functions of tensors (plus optional cross-rank gathering).

Every contrastive loss gathers the other ranks' embeddings *with gradient* when
torch.distributed is initialised, so the set of negatives (and the method) does not change
with the number of workers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from trainer.distributed import gather_plain, gather_with_grad, rank_offset


@contextlib.contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Compute similarity logits in fp32 even inside a bf16 autocast region.

    With T=0.07 the logits reach ~14; bf16 keeps 8 mantissa bits (error ~0.06 per logit), which
    visibly changes a contrastive loss. The [V*B, V*N] matrix is small, so fp32 costs nothing.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (float64 checks stay float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _self_mask(self_col: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Bool [rows, n_cols] mask with one True per row (F.one_hot would allocate int64: 8x the memory)."""
    mask = torch.zeros(self_col.shape[0], n_cols, dtype=torch.bool, device=self_col.device)
    return mask.scatter_(1, self_col[:, None], True)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
            gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: positives are (z1[i], z2[i]); all other views negative.

    Mean over this rank's 2B anchors; the negatives include every rank's views when gathered.
    """
    return multi_positive_nt_xent([z1, z2], temperature, gather)


def multi_positive_nt_xent(views: list[torch.Tensor], temperature: float = 0.5,
                           gather: bool = True, detach_right: bool = False) -> torch.Tensor:
    """NT-Xent over V stacked views in which all V views of one image are positives of each other.

    With V=2 this is SimCLR's loss; RoCL uses V=3 ([t(x); t'(x); t(x)_adv]). For each anchor,
    loss = -mean over its positives p of log( exp(s_ap/T) / sum_{k != a} exp(s_ak/T) ).
    `detach_right` reproduces RoCL's reference quirk (similarities with a detached right operand).
    """
    with _fp32(views[0].device):
        return _multi_positive_nt_xent([at_least_fp32(v) for v in views], temperature, gather, detach_right)


def _multi_positive_nt_xent(views: list[torch.Tensor], temperature: float, gather: bool,
                            detach_right: bool) -> torch.Tensor:
    local_b = views[0].shape[0]
    anchors = torch.cat([F.normalize(v, dim=1) for v in views], dim=0)  # [V*B, D]
    others = [F.normalize(gather_with_grad(v) if gather else v, dim=1) for v in views]
    full_b = others[0].shape[0]
    right = torch.cat(others, dim=0)  # [V*N, D]
    if detach_right:
        right = right.detach()
    n_views = len(views)
    logits = anchors @ right.t() / temperature  # [V*B, V*N]
    offset = rank_offset(local_b) if gather else 0
    idx = torch.arange(local_b, device=logits.device) + offset  # global index of each local image
    rows = torch.arange(n_views * local_b, device=logits.device)
    image = idx.repeat(n_views)  # global image index of each anchor
    view_of_anchor = torch.arange(n_views, device=logits.device).repeat_interleave(local_b)
    self_col = view_of_anchor * full_b + image
    logits = logits.masked_fill(_self_mask(self_col, n_views * full_b), float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos_cols = torch.stack([v * full_b + image for v in range(n_views)], dim=1)  # [V*B, V]
    pos_mask = pos_cols != self_col[:, None]
    pos_log_prob = log_prob[rows[:, None], pos_cols]
    return -pos_log_prob.masked_fill(~pos_mask, 0.0).sum(1).div(n_views - 1).mean()


def supcon(features: torch.Tensor, labels: torch.Tensor | None = None,
           temperature: float = 0.07, gather: bool = True) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.), `features` [B, V, D]; no labels -> SimCLR.

    For each anchor: -1/|P(a)| sum_p log softmax over all other views, P(a) = same label.
    (Khosla et al.'s code also multiplies by temperature/base_temperature; both are 0.07 here.)
    """
    with _fp32(features.device):
        return _supcon(at_least_fp32(features), labels, temperature, gather)


def _supcon(features: torch.Tensor, labels: torch.Tensor | None, temperature: float,
            gather: bool) -> torch.Tensor:
    b, v, _ = features.shape
    feats = F.normalize(features, dim=2)
    if labels is None:
        labels = torch.arange(b, device=features.device) + rank_offset(b) * int(gather)
    anchor = torch.cat(feats.unbind(1), dim=0)  # [V*B, D]
    all_feats = gather_with_grad(feats) if gather else feats
    all_labels = gather_plain(labels) if gather else labels
    n = all_feats.shape[0]
    right = torch.cat(all_feats.unbind(1), dim=0)  # [V*N, D]
    logits = anchor @ right.t() / temperature
    anchor_labels = labels.repeat(v)
    right_labels = all_labels.repeat(v)
    offset = rank_offset(b) if gather else 0
    self_col = (torch.arange(v, device=features.device).repeat_interleave(b) * n
                + (torch.arange(b, device=features.device) + offset).repeat(v))
    self_mask = _self_mask(self_col, v * n)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (anchor_labels[:, None] == right_labels[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp_min(1)).mean()


def rocl_loss(z_t: torch.Tensor, z_t2: torch.Tensor, z_adv: torch.Tensor,
              temperature: float = 0.5, lam: float = 256.0, gather: bool = True,
              detach_right: bool = True, sum_positives: bool = True,
              reg: tuple[torch.Tensor, torch.Tensor] | None = None, reg_gather: bool | None = None) -> torch.Tensor:
    """RoCL: NT-Xent over [t(x); t'(x); t(x)_adv] (all positives) + (1/lam) NT-Xent(adv, t').

    `sum_positives` keeps the reference code's scale: its NT_xent sums the -log p terms of an
    anchor's two positives (6 diagonal blocks / 3N), i.e. 2x the mean over positives that
    `multi_positive_nt_xent` returns; this sets the weight of the 1/lam regulariser.
    `reg` = (z_adv, z_t2) of the 1/lam term when it has its own forward (the reference's), else
    the main term's; `reg_gather` its negatives from every rank (default: `gather`).
    """
    main = multi_positive_nt_xent([z_t, z_t2, z_adv], temperature, gather, detach_right)
    if sum_positives:
        main = main * 2
    r_adv, r_t2 = reg if reg is not None else (z_adv, z_t2)
    reg_loss = multi_positive_nt_xent([r_adv, r_t2], temperature, gather if reg_gather is None else reg_gather,
                                      detach_right)
    return main + reg_loss / lam


def neg_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example negative cosine similarity."""
    return -F.cosine_similarity(a, b, dim=1)


def deacl_loss(student_clean: torch.Tensor, student_adv: torch.Tensor,
               teacher_clean: torch.Tensor, lam: float = 2.0) -> torch.Tensor:
    """DeACL: -mean cos(f_s(x), f_t(x)) - lam * mean cos(f_s(x'), f_s(x)) (grad through both)."""
    return neg_cosine(student_clean, teacher_clean).mean() + lam * neg_cosine(student_adv, student_clean).mean()


def deacl_attack_objective(student_adv: torch.Tensor, teacher_clean: torch.Tensor) -> torch.Tensor:
    """What DeACL's PGD maximises: -cos(f_s(x'), f_t(x)) per example."""
    return neg_cosine(student_adv, teacher_clean)


def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(p_clean || p_adv) as TRADES writes it: KLDiv(log_softmax(adv), softmax(clean))."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction=reduction)
