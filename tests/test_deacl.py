"""DeACL stage 2: loss and attack objective on hand-checkable inputs; the teacher stays frozen."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.attacks import PGDConfig
from trainer.checkpoint import save_model
from conf import compose
from trainer.losses import deacl_attack_objective, deacl_loss
from trainer.methods import build_method
from trainer.models import build_encoder


def test_deacl_loss_hand_computed():
    # student clean (1,0), student adv (0,1) -> cos 0; teacher (1,1)/sqrt2 -> cos(s,t) = 1/sqrt2
    s_clean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s_adv = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # example 1: cos(s,t)=1/sqrt2, cos(adv,s)=0 ; example 2: cos(s,t)=-1, cos(adv,s)=1
    expected = -(1 / math.sqrt(2) + -1) / 2 - 2.0 * (0 + 1) / 2
    assert deacl_loss(s_clean, s_adv, t, lam=2.0).item() == pytest.approx(expected, abs=1e-6)
    assert deacl_loss(s_clean, s_adv, t, lam=0.0).item() == pytest.approx(-(1 / math.sqrt(2) - 1) / 2, abs=1e-6)


def test_deacl_loss_gradient_flows_through_both_student_terms():
    s_clean = torch.randn(4, 8, requires_grad=True)
    s_adv = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    deacl_loss(s_clean, s_adv, t).backward()
    assert s_clean.grad.abs().sum() > 0 and s_adv.grad.abs().sum() > 0


def test_attack_objective_is_negative_cosine_to_teacher():
    s_adv = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [-1.0, -1.0]])
    assert torch.allclose(deacl_attack_objective(s_adv, t), torch.tensor([-1.0, 1.0]), atol=1e-6)


def _tiny_cfg(tmp_path):
    return compose([f"output_dir={tmp_path}", "model.width=4", "attack.steps=2"])


def test_teacher_bit_identical_and_attack_pushes_away(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg(tmp_path)
    teacher = build_encoder(cfg["model"], cfg["data"]["stats"], with_projector=True)
    save_model(tmp_path / "teacher.pt", teacher, cfg["model"], cfg["data"]["stats"])
    method = build_method(cfg, cfg["method"], torch.device("cpu"), teacher_path=str(tmp_path / "teacher.pt"))
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    # student initialised from the teacher (init_from_teacher: true)
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(v, before[k])
    opt = torch.optim.SGD(method.encoder.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(16, 3, 32, 32)
    for _ in range(3):
        method.train()
        loss, metrics = method.training_step({"views": [x], "label": torch.zeros(16, dtype=torch.long)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = method.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher changed during stage 2"
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not method.teacher.training
    # the student did move
    assert any(not torch.equal(before[k], v) for k, v in method.encoder.state_dict().items()
               if k in before and v.dtype.is_floating_point)
    assert set(metrics) == {"loss", "cos_teacher", "cos_adv"}


def test_deacl_attack_objective_increases_under_pgd(tmp_path):
    from trainer.attacks import network_mode, pgd_attack

    torch.manual_seed(1)
    cfg = _tiny_cfg(tmp_path)
    enc = build_encoder(cfg["model"], cfg["data"]["stats"], with_projector=False)
    teacher = build_encoder(cfg["model"], cfg["data"]["stats"], with_projector=False).eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        f_t = teacher(x)
    obj = lambda xa: deacl_attack_objective(enc(xa), f_t)  # noqa: E731
    with network_mode([enc], train=False):
        x_adv = pgd_attack(x, obj, PGDConfig(steps=5))
        with torch.no_grad():
            assert obj(x_adv).mean() > obj(x).mean()
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
