"""Every loss against an independent, naive computation on small inputs."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from trainer.losses import (deacl_attack_objective, deacl_loss, multi_positive_nt_xent, nt_xent, rocl_loss,
                            supcon, trades_kl)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def naive_multi_positive(views: list[torch.Tensor], t: float) -> torch.Tensor:
    """Double loop: anchor (v, i); positives (w, i) w != v; denominator: every other view."""
    n_views, b = len(views), views[0].shape[0]
    items = [(v, i) for v in range(n_views) for i in range(b)]
    total = torch.zeros(())
    for v, i in items:
        denom = sum(math.exp(_cos(views[v][i], views[w][j]) / t) for w, j in items if (w, j) != (v, i))
        terms = [-math.log(math.exp(_cos(views[v][i], views[w][i]) / t) / denom)
                 for w in range(n_views) if w != v]
        total += sum(terms) / len(terms)
    return total / len(items)


def naive_supcon(feats: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    b, n_views, _ = feats.shape
    items = [(i, v) for v in range(n_views) for i in range(b)]
    total = 0.0
    for i, v in items:
        denom = sum(math.exp(_cos(feats[i, v], feats[j, w]) / t) for j, w in items if (j, w) != (i, v))
        pos = [(j, w) for j, w in items if (j, w) != (i, v) and labels[j] == labels[i]]
        total += -sum(math.log(math.exp(_cos(feats[i, v], feats[j, w]) / t) / denom) for j, w in pos) / len(pos)
    return total / len(items)


def test_nt_xent_matches_naive_double_loop():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    for t in (0.5, 0.2):
        assert nt_xent(z1, z2, t).item() == pytest.approx(naive_multi_positive([z1, z2], t).item(), rel=1e-5)


def test_nt_xent_perfect_alignment_is_lower_than_random():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.5) < nt_xent(z, torch.randn(8, 16), 0.5)


def test_multi_positive_three_views_matches_naive():
    torch.manual_seed(1)
    views = [torch.randn(4, 6) for _ in range(3)]
    got = multi_positive_nt_xent(views, 0.5, gather=False)
    assert got.item() == pytest.approx(naive_multi_positive(views, 0.5).item(), rel=1e-5)


def test_detach_right_same_value_gradient_only_through_anchors():
    torch.manual_seed(2)
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    full = multi_positive_nt_xent([a, b], 0.5, gather=False)
    quirk = multi_positive_nt_xent([a, b], 0.5, gather=False, detach_right=True)
    assert quirk.item() == pytest.approx(full.item(), rel=1e-6)
    g_full = torch.autograd.grad(full, a)[0]
    g_quirk = torch.autograd.grad(quirk, a)[0]
    assert not torch.allclose(g_full, g_quirk)
    # Independent reference: RoCL's pairwise_similarity (normalised rows @ detached normalised rows^T).
    out = torch.cat([a, b])
    n = out / out.norm(dim=1, keepdim=True)
    sim = (n @ n.t().detach()) / 0.5
    sim = sim.masked_fill(torch.eye(8, dtype=torch.bool), float("-inf"))
    logp = sim.log_softmax(1)
    idx = torch.arange(8)
    ref = -logp[idx, (idx + 4) % 8].mean()
    assert torch.allclose(torch.autograd.grad(ref, a)[0], g_quirk, atol=1e-6)


def test_supcon_with_labels_matches_naive_loop():
    torch.manual_seed(3)
    feats = torch.randn(6, 2, 5)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    got = supcon(feats, labels, 0.07, gather=False)
    assert got.item() == pytest.approx(naive_supcon(feats, labels, 0.07), rel=1e-5)


def test_supcon_without_labels_is_simclr_nt_xent():
    torch.manual_seed(4)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    got = supcon(torch.stack([z1, z2], 1), None, 0.2, gather=False)
    assert got.item() == pytest.approx(nt_xent(z1, z2, 0.2, gather=False).item(), rel=1e-5)
    # with all-distinct labels it is the same too
    got_l = supcon(torch.stack([z1, z2], 1), torch.arange(5), 0.2, gather=False)
    assert got_l.item() == pytest.approx(got.item(), rel=1e-6)


def test_rocl_loss_matches_reference_formula():
    torch.manual_seed(5)
    z_t, z_t2, z_adv = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    main = naive_multi_positive([z_t, z_t2, z_adv], 0.5)
    reg = naive_multi_positive([z_adv, z_t2], 0.5)
    # reference scale: sum over an anchor's 2 positives, i.e. 2x the mean over positives
    got = rocl_loss(z_t, z_t2, z_adv, 0.5, lam=256.0, gather=False)
    assert got.item() == pytest.approx((2 * main + reg / 256).item(), rel=1e-5)
    got_mean = rocl_loss(z_t, z_t2, z_adv, 0.5, lam=4.0, gather=False, sum_positives=False)
    assert got_mean.item() == pytest.approx((main + reg / 4).item(), rel=1e-5)


def test_rocl_reference_nt_xent_block_sum():
    """Our reference-scale main term equals RoCL's NT_xent(adv_type='Rep') written out."""
    torch.manual_seed(6)
    n = 3
    out = torch.randn(3 * n, 5)
    z = out / (out.norm(dim=1, keepdim=True) + 1e-8)
    e = torch.exp(z @ z.t() / 0.5) * (1 - torch.eye(3 * n))
    loss_mat = -torch.log(e / e.sum(1, keepdim=True))
    blocks = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    ref = sum(torch.diag(loss_mat[i * n:(i + 1) * n, j * n:(j + 1) * n]).sum() for i, j in blocks) / (3 * n)
    ours = 2 * multi_positive_nt_xent([out[:n], out[n:2 * n], out[2 * n:]], 0.5, gather=False)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_deacl_loss_hand_checkable():
    s_clean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s_adv = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # cos(s, t) = [1/sqrt2, -1]; cos(adv, s) = [0, 1]
    expected = -(1 / math.sqrt(2) - 1) / 2 - 2.0 * (0 + 1) / 2
    assert deacl_loss(s_clean, s_adv, t, lam=2.0).item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(deacl_attack_objective(s_adv, t), torch.tensor([-1 / math.sqrt(2), 1.0]), atol=1e-6)


def test_trades_kl_matches_formula():
    torch.manual_seed(7)
    adv, clean = torch.randn(5, 10), torch.randn(5, 10)
    p = clean.softmax(1)
    expected = (p * (p.log() - adv.log_softmax(1))).sum() / 5
    assert trades_kl(adv, clean).item() == pytest.approx(expected.item(), rel=1e-5)
    assert trades_kl(clean, clean).item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_losses_stay_fp32_under_bf16_autocast():
    torch.manual_seed(8)
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    ref = nt_xent(z1, z2, 0.07, gather=False)
    ref_sc = supcon(torch.stack([z1, z2], 1), torch.arange(16) % 3, 0.07, gather=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z1 @ z2.t()).dtype == torch.bfloat16  # autocast would lower the similarity matmul
        got = nt_xent(z1, z2, 0.07, gather=False)
        got_sc = supcon(torch.stack([z1, z2], 1), torch.arange(16) % 3, 0.07, gather=False)
        got_bf = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.07, gather=False)
    assert got.dtype == torch.float32 and got_sc.dtype == torch.float32 and got_bf.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert got_sc.item() == pytest.approx(ref_sc.item(), rel=1e-6)


# ---- cross-rank gathering: 2 gloo processes must reproduce the single-process full-batch loss ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, z1, z2, feats, labels, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z1.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        a1 = z1[sl].clone().requires_grad_(True)
        a2 = z2[sl].clone().requires_grad_(True)
        loss = nt_xent(a1, a2, 0.5)
        loss.backward()
        sc = supcon(feats[sl], labels[sl], 0.07)
        r = rocl_loss(a1.detach(), a2.detach(), a1.detach() * 0.5 + 0.1, 0.5)
        out[rank] = (loss.item(), a1.grad.clone(), sc.item(), r.item())
    finally:
        dist.destroy_process_group()


def test_gathered_losses_match_full_batch_on_two_ranks():
    import torch.multiprocessing as mp

    torch.manual_seed(9)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    feats, labels = torch.randn(8, 2, 6), torch.tensor([0, 1, 1, 2, 0, 2, 1, 0])
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gather_worker, args=(2, _free_port(), z1, z2, feats, labels, out), nprocs=2, join=True)
    a1 = z1.clone().requires_grad_(True)
    full = nt_xent(a1, z2, 0.5, gather=False)
    full.backward()
    # each rank's loss is the mean over its own anchors; their average is the full-batch loss
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(full.item(), rel=1e-5)
    # DDP averages gradients over ranks; all_gather's backward sums the other ranks' terms
    grad = torch.cat([out[0][1], out[1][1]]) / 2
    assert torch.allclose(grad, a1.grad, atol=1e-6)
    assert (out[0][2] + out[1][2]) / 2 == pytest.approx(supcon(feats, labels, 0.07, gather=False).item(), rel=1e-5)
    full_r = rocl_loss(z1, z2, z1 * 0.5 + 0.1, 0.5, gather=False)
    assert (out[0][3] + out[1][3]) / 2 == pytest.approx(full_r.item(), rel=1e-5)
