"""The one PGD engine: threat-model constraints, ascent, no side effects on the network."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.adversarial_training import pgd_at_loss, trades_loss
from trainer.attacks import PGDConfig, network_mode, pgd_attack


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _data(b: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, 8, 8, generator=g)
    x[:, :, :2] = 0.0  # pixels at the [0, 1] boundary: the clip must hold there
    x[:, :, -2:] = 1.0
    return x, torch.randint(0, 10, (b,), generator=g)


def _ce(model, y):
    return lambda xa: F.cross_entropy(model(xa), y, reduction="none")


@pytest.mark.parametrize("start", ["uniform", "normal"])
def test_linf_stays_in_ball_and_box_and_increases_objective(start):
    model = _model().eval()
    x, y = _data()
    cfg = PGDConfig(eps=8 / 255, alpha=2 / 255, steps=10, start=start)
    x_adv = pgd_attack(x, _ce(model, y), cfg)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= cfg.eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    assert (x_adv - x).abs().max() > cfg.eps / 2  # it actually moved


def test_l2_stays_in_ball_and_increases_objective():
    model = _model().eval()
    x, y = _data()
    cfg = PGDConfig(eps=0.5, alpha=0.1, steps=10, norm="l2")
    x_adv = pgd_attack(x, _ce(model, y), cfg)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= cfg.eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_parameters_and_their_grads_untouched():
    model = _model()
    x, y = _data()
    model(x).sum().backward()  # some existing .grad to preserve
    model[0].bias.grad = None  # and one None that must stay None
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: (None if v.grad is None else v.grad.clone()) for k, v in model.named_parameters()}
    with network_mode([model], train=False):
        pgd_attack(x, _ce(model, y), PGDConfig(steps=3))
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])
        assert (v.grad is None) if grads[k] is None else torch.equal(v.grad, grads[k])


def test_eval_mode_attack_leaves_bn_running_stats_and_restores_modes():
    model = _model().train()
    model[1].eval()  # a mixed-mode network: each submodule's mode must come back as it was
    x, y = _data()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    modes = [m.training for m in model.modules()]
    with network_mode([model], train=False):
        assert not any(m.training for m in model.modules())
        pgd_attack(x, _ce(model, y), PGDConfig(steps=3))
    assert [m.training for m in model.modules()] == modes
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v)


def test_zero_steps_or_eps_returns_clean_copy_and_per_example_independence():
    model = _model().eval()
    x, y = _data(8)
    for cfg in (PGDConfig(steps=0), PGDConfig(eps=0.0)):
        out = pgd_attack(x, _ce(model, y), cfg)
        assert torch.equal(out, x) and out is not x
    # Per-example objective is summed: an example's perturbation does not depend on the batch.
    cfg = PGDConfig(steps=4, random_start=False)
    full = pgd_attack(x, _ce(model, y), cfg)
    half = pgd_attack(x[:4], _ce(model, y[:4]), cfg)
    assert torch.allclose(full[:4], half, atol=1e-6)


def test_works_inside_no_grad_and_with_a_scalar_objective():
    model = _model().eval()
    x, y = _data()
    with torch.no_grad():
        x_adv = pgd_attack(x, lambda xa: F.cross_entropy(model(xa), y), PGDConfig(steps=2))
    assert (x_adv - x).abs().max() > 0


def test_supervised_adversarial_losses_attack_in_eval_mode():
    model = _model().train()
    x, y = _data()
    stats = model[1].running_mean.clone()
    loss, logits = pgd_at_loss(model, model, x, y, PGDConfig(steps=2))
    assert logits.shape == (16, 10) and loss.requires_grad
    loss, logits = trades_loss(model, model, x, y, PGDConfig(steps=2), beta=6.0)
    assert logits.shape == (16, 10) and loss.requires_grad
    # the attacks ran in eval mode: only the training forwards moved the running stats (PGD-AT one,
    # TRADES three: x, x', x again, as trades.py)
    assert model.training and model[1].training
    assert model[1].num_batches_tracked.item() == 1 + 3
    assert not torch.equal(model[1].running_mean, stats)
    trades_loss(model, model, x, y, PGDConfig(steps=2), beta=6.0, forwards="two")
    trades_loss(model, model, x, y, PGDConfig(steps=2), beta=6.0, forwards="one")
    assert model[1].num_batches_tracked.item() == 4 + 2 + 1


def test_random_start_kinds_and_the_clip_before_the_first_gradient():
    """random_start=false starts at x; clamp_start clips x + delta to [0, 1] before the first gradient
    (RoCL); without it a pixel at 0 or 1 starts outside the box (ACL, DeACL, TRADES)."""
    from trainer.attacks import random_start

    x, _ = _data()
    seen = []

    def objective(xa):
        seen.append(xa.detach().clone())
        return xa.sum()

    for clamp in (False, True):
        seen.clear()
        torch.manual_seed(0)
        cfg = PGDConfig(steps=1, clamp_start=clamp)
        pgd_attack(x, objective, cfg)
        torch.manual_seed(0)
        assert torch.equal(seen[0], random_start(x, cfg))
        outside = (seen[0] < 0) | (seen[0] > 1)
        assert bool(outside.any()) != clamp  # unclipped: boundary pixels start outside [0, 1]
    seen.clear()
    pgd_attack(x, objective, PGDConfig(steps=1, random_start=False))
    assert torch.equal(seen[0], x)
    torch.manual_seed(0)
    start = random_start(x, PGDConfig(start="normal"))
    assert (start - x).abs().max() < 0.01 and ((start < 0) | (start > 1)).any()


def test_attack_sections_carry_the_start_keys():
    from trainer.attacks import merged_attack, pgd_config

    section = {"eps": 0.03, "alpha": 0.01, "steps": 3, "norm": "linf", "gather_negatives": True,
               "random_start": True, "start": "uniform", "clamp_start": False}
    cfg = pgd_config(merged_attack(section, {"steps": 7, "clamp_start": True, "alpha": None}))
    assert (cfg.steps, cfg.clamp_start, cfg.alpha, cfg.random_start) == (7, True, 0.01, True)
    assert pgd_config({k: section[k] for k in ("eps", "alpha", "steps", "norm")}).clamp_start is False
