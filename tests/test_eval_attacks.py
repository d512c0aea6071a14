"""The reporting attacks on a trained model: our PGD-20 agrees with torchattacks.PGD (an independent
implementation), and AutoAttack (the authors' pyautoattack, standard version, through our wrapper)
runs at the standard's strength, is never weaker than PGD-20 on the same images, and finds at least
what 100-step APGD-CE alone finds.

A width-4 ResNet-18 classifier (our Encoder + linear head) is trained on digits (16x16) with CE
for a few epochs, in-process, without Ray: PGD-20 at eps 8/255 then leaves about half of the
images correctly classified (neither 0 nor the clean accuracy), so both comparisons are informative.
(A PGD-AT model is ~89% robust on digits at 8/255: too few attackable points to compare attacks.)
Torch runs single-threaded here: with 2 threads on a shared, oversubscribed CPU, the many tiny
kernels of AutoAttack's Square attack ran 25x slower.
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.sources import load_source
from trainer.evaluation.protocols import Classifier
from trainer.attacks import pgd_config
from trainer.evaluation.autoattack import build_autoattack, run_autoattack
from trainer.evaluation.robustness import clean_and_pgd_counts
from trainer.models import build_encoder

EPS, ALPHA = 8 / 255, 2 / 255
RESOLUTION = 16


def _tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    src = load_source({"name": "digits", "resolution": RESOLUTION, "val_fraction": 0}, split)
    # NCHW-contiguous: channels-last CPU input crashed conv backward in torch 2.14.1 with 2 threads
    x = torch.from_numpy(np.asarray(src.images)).permute(0, 3, 1, 2).float().div(255).contiguous()
    return x, torch.from_numpy(np.asarray(src.labels)).long()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(single_thread):
    torch.manual_seed(0)
    x_tr, y_tr = _tensors("train")
    x_te, y_te = _tensors("test")
    model = Classifier(build_encoder({"arch": "resnet18", "width": 4}, "digits", with_projector=False), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    t0 = time.time()
    for epoch in range(4):
        model.train()
        perm = torch.randperm(len(y_tr))
        for i in range(0, len(perm) - 63, 64):
            x, y = x_tr[perm[i:i + 64]], y_tr[perm[i:i + 64]]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"\n[test_eval_attacks] trained in {time.time() - t0:.0f}s")
    # all 360 test images + 640 training images: 1,000 examples make "within 1 point" a
    # statement about the attacks, not about which random start hit which borderline example
    return model.eval(), torch.cat([x_te, x_tr[:640]]), torch.cat([y_te, y_tr[:640]])


def _pgd20_accuracy(model, x, y) -> tuple[float, float]:
    counts = clean_and_pgd_counts(model, [{"views": [x], "label": y}],
                                  pgd_config({"eps": EPS, "alpha": ALPHA, "steps": 20, "norm": "linf"}))
    return counts.clean / counts.total, counts.robust / counts.total


def test_pgd20_agrees_with_torchattacks(trained):
    import torchattacks

    model, x, y = trained
    torch.manual_seed(1)
    clean, ours = _pgd20_accuracy(model, x, y)
    attack = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=20, random_start=True)
    x_adv = attack(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        theirs = (model(x_adv).argmax(1) == y).float().mean().item()
    print(f"\n[test_eval_attacks] n={len(y)} clean {clean:.4f} PGD-20 ours {ours:.4f} torchattacks {theirs:.4f}")
    assert clean > 0.7
    assert 0.1 < ours < clean - 0.1, "robust accuracy is degenerate: the test would prove nothing"
    assert abs(ours - theirs) <= 0.01


def test_autoattack_is_the_standard_configuration(trained):
    model, _, _ = trained
    aa = build_autoattack(model, EPS, "Linf", 10, "standard", 0, "cpu")
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa.norm == "Linf" and aa.epsilon == EPS
    assert (aa.apgd.n_iter, aa.apgd.n_restarts, aa.apgd.loss) == (100, 1, "ce")
    assert (aa.apgd_targeted.n_iter, aa.apgd_targeted.n_target_classes, aa.apgd_targeted.n_restarts) == (100, 9, 1)
    assert (aa.fab.n_iter, aa.fab.n_target_classes, aa.fab.n_restarts) == (100, 9, 1)
    assert aa.square.n_queries == 5000
    fewer = build_autoattack(model, EPS, "Linf", 5, "standard", 0, "cpu")  # 5 classes: 4 targets
    assert (fewer.apgd_targeted.n_target_classes, fewer.fab.n_target_classes) == (4, 4)


@pytest.fixture(scope="module")
def autoattacked(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    torch.manual_seed(2)
    _, pgd = _pgd20_accuracy(model, x, y)
    res = run_autoattack(model, x, y, eps=EPS, num_classes=10, seed=0, label="test")
    print(f"\n[test_eval_attacks] n={len(y)} PGD-20 {pgd:.4f} AutoAttack {res.robust:.4f} after {res.after} "
          f"({res.seconds:.0f}s)")
    return pgd, res


def test_autoattack_never_above_pgd20_on_the_same_images(autoattacked, capsys):
    pgd, res = autoattacked
    assert pgd > 0.1 and res.n == 32
    assert res.robust <= pgd
    after = [res.after[a] for a in ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert after == sorted(after, reverse=True) and after[-1] == pytest.approx(res.robust)


def test_autoattack_finds_at_least_what_apgd_ce_alone_finds(trained, autoattacked):
    from pyautoattack import AutoAttack

    model, x, y = trained
    _, res = autoattacked
    alone = AutoAttack(model, eps=EPS, norm="Linf", version="custom", attacks=["apgd-ce"], seed=0)
    alone.apgd.n_iter, alone.apgd.n_restarts = 100, 1
    x_adv, _ = alone.run_standard_evaluation(x[:32], y[:32], batch_size=32)
    with torch.no_grad():
        apgd = (model(x_adv).argmax(1) == y[:32]).float().mean().item()
    assert res.robust <= apgd
    assert res.after["apgd-ce"] == pytest.approx(apgd)  # the same attack, seed and images


def test_autoattack_prints_progress(trained, capsys):
    model, x, y = trained
    run_autoattack(model, x[:8], y[:8], eps=EPS, num_classes=10, version="rand", seed=0, label="stage/slf")
    out = capsys.readouterr().out
    batch = re.search(r"\[stage/slf\] AutoAttack apgd-ce 1/1 batches robust_so_far ([0-9.]+) \| .* eta", out)
    after = re.search(r"\[stage/slf\] AutoAttack after apgd-ce: robust ([0-9.]+) of 8 images", out)
    assert batch and after, out
    assert float(batch.group(1)) == pytest.approx(float(after.group(1)), abs=1e-3)  # counted from the clean ones


def test_progress_totals_count_only_the_batches_a_capped_attack_visits():
    """The curve's and black-box's progress lines end at 100%: their total is the capped batches, not the split."""
    from trainer.evaluation.robustness import attacked_batches, rank_share

    assert rank_share(None, 2) is None and rank_share(100, 1) == 100 and rank_share(101, 2) == 51
    assert attacked_batches(8, None, 32) == 8
    assert attacked_batches(8, rank_share(100, 1), 32) == 4  # 100 images at 32 per batch: 3 full batches and a part
    assert attacked_batches(8, rank_share(100, 2), 32) == 2  # 50 per rank
    assert attacked_batches(2, rank_share(1000, 1), 32) == 2  # the cap is larger than the split
