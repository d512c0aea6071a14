"""Dual BN (ACL-DS): the two BN sets never mix, and export gives the `pgd` set."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import composed
from trainer.checkpoint import load_encoder, save_model
from trainer.methods import build_method
from trainer.models import build_encoder
from trainer.models.dual_bn import DualBatchNorm, bn_route, convert_dual_bn_to_single, has_dual_bn

MODEL = {"arch": "resnet18", "width": 4, "stem_padding": 1, "proj_hidden_dim": 16, "proj_output_dim": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bn_state(enc: nn.Module, route: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in enc.state_dict().items() if f".{route}." in k}


def _cfg(**method):
    cfg = composed("method=acl", "model.width=4", "model.proj_hidden_dim=16", "model.proj_output_dim=8")
    cfg["attack"].update(eps=8 / 255, alpha=2 / 255, steps=2)
    return cfg, {**cfg["method"], "variant": "ds", "temperature": 0.5, **method}


def test_every_bn_is_dual_projector_included():
    enc = build_encoder(MODEL, "digits", with_projector=True, dual_bn=True)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(p, DualBatchNorm)
                   for p in enc.modules() for m in p.children())
    assert any(isinstance(m, DualBatchNorm) for m in enc.projector.modules())


@pytest.mark.parametrize("route,other", [("normal", "pgd"), ("pgd", "normal")])
def test_one_route_never_changes_the_other_sets_running_stats(route, other):
    torch.manual_seed(0)
    enc = build_encoder(MODEL, "digits", with_projector=True, dual_bn=True).train()
    before_other, before_mine = _bn_state(enc, other), _bn_state(enc, route)
    with bn_route(enc, route):
        for _ in range(2):
            h, z = enc(torch.rand(8, 3, 16, 16), project=True)
            z.sum().backward()
    for k, v in _bn_state(enc, other).items():
        assert torch.equal(v, before_other[k]), k
    for p_name, p in enc.named_parameters():  # no gradient reaches the other set's affine params
        if f".{other}." in p_name:
            assert p.grad is None, p_name
    changed = [k for k, v in _bn_state(enc, route).items() if "running_mean" in k and not torch.equal(v, before_mine[k])]
    assert changed  # this route's statistics did move


def test_bn_route_restores_previous_route():
    enc = build_encoder(MODEL, "digits", dual_bn=True)
    duals = [m for m in enc.modules() if isinstance(m, DualBatchNorm)]
    with bn_route(enc, "pgd"):
        assert all(m.route == "pgd" for m in duals)
    assert all(m.route == "normal" for m in duals)
    with pytest.raises(ValueError):
        with bn_route(enc, "adv"):
            pass


def test_convert_dual_bn_to_single_gives_the_pgd_set():
    torch.manual_seed(0)
    enc = build_encoder(MODEL, "digits", with_projector=True, dual_bn=True).train()
    # make the two sets differ: different data through each route
    with bn_route(enc, "normal"):
        enc(torch.rand(8, 3, 16, 16), project=True)
    with bn_route(enc, "pgd"):
        enc(torch.rand(8, 3, 16, 16) * 0.3, project=True)
    single = convert_dual_bn_to_single(enc, "pgd").eval()
    enc.eval()
    assert not has_dual_bn(single) and has_dual_bn(enc)  # the original is untouched
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad(), bn_route(enc, "pgd"):
        h_pgd, z_pgd = enc(x, project=True)
    with torch.no_grad(), bn_route(enc, "normal"):
        h_normal = enc(x)
    h_single, z_single = single(x, project=True)
    assert torch.allclose(h_single, h_pgd, atol=1e-6) and torch.allclose(z_single, z_pgd, atol=1e-6)
    assert not torch.allclose(h_single, h_normal, atol=1e-4)


def test_acl_export_is_single_bn_pgd_set_and_reloads(tmp_path):
    torch.manual_seed(0)
    cfg, m = _cfg()
    method = build_method(cfg, m, torch.device("cpu"))
    assert has_dual_bn(method.encoder)
    method.train()
    loss, _ = method.training_step({"views": [torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)],
                                    "label": torch.zeros(8, dtype=torch.long)})
    loss.backward()
    exported = method.export_encoder()
    assert not has_dual_bn(exported)
    save_model(tmp_path / "model.pt", exported, cfg["model"], "digits")
    save_model(tmp_path / "full.pt", method.encoder, cfg["model"], "digits")
    from_export = load_encoder(tmp_path / "model.pt").eval()
    from_full = load_encoder(tmp_path / "full.pt", bn_route="pgd").eval()  # dual checkpoint -> pgd set
    method.encoder.eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad(), bn_route(method.encoder, "pgd"):
        ref = method.encoder(x)
    with torch.no_grad():
        assert torch.allclose(from_export(x), ref, atol=1e-6)
        assert torch.allclose(from_full(x), ref, atol=1e-6)
        # outside training steps the encoder itself runs the exported (pgd) set (kNN monitor)
        assert torch.allclose(method.encoder(x), ref, atol=1e-6)


class _RouteRecorder:
    """Counts, per route, the BN forwards that happen (forward hooks on every normal/pgd BN)."""

    def __init__(self, enc: nn.Module) -> None:
        self.calls = {"normal": 0, "pgd": 0}
        self.train_calls = {"normal": 0, "pgd": 0}
        for m in enc.modules():
            if isinstance(m, DualBatchNorm):
                for route in ("normal", "pgd"):
                    getattr(m, route).register_forward_hook(self._hook(route))

    def _hook(self, route):
        def hook(module, inp, out):
            self.calls[route] += 1
            self.train_calls[route] += int(module.training)
        return hook


@pytest.mark.parametrize("variant", ["ds", "a2s"])
def test_acl_attack_uses_pgd_bn_in_eval_mode_and_loss_uses_both(variant):
    torch.manual_seed(0)
    cfg, m = _cfg(variant=variant)
    method = build_method(cfg, m, torch.device("cpu"))
    rec = _RouteRecorder(method.encoder)
    method.train()
    x1, x2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    before = {r: _bn_state(method.encoder, r) for r in ("normal", "pgd")}
    method.make_adversarial(x1, x2)
    n_bn = sum(isinstance(mm, DualBatchNorm) for mm in method.encoder.modules())
    # DS: the whole attack runs on the pgd set; A2S: one clean forward of x2 on normal, rest pgd
    assert rec.calls["normal"] == (0 if variant == "ds" else n_bn)
    assert rec.calls["pgd"] == cfg["attack"]["steps"] * n_bn
    assert rec.train_calls == {"normal": 0, "pgd": 0}  # eval mode during the attack
    for r in ("normal", "pgd"):  # so no running statistic moved
        for k, v in _bn_state(method.encoder, r).items():
            assert torch.equal(v, before[r][k]), k
    rec.calls = {"normal": 0, "pgd": 0}
    rec.train_calls = {"normal": 0, "pgd": 0}
    loss, metrics = method.training_step({"views": [x1, x2], "label": torch.zeros(8, dtype=torch.long)})
    assert rec.train_calls["normal"] == n_bn and rec.train_calls["pgd"] == n_bn
    loss.backward()
    for name, p in method.encoder.named_parameters():
        assert p.grad is not None, name  # every parameter, both BN sets included, gets a gradient
    if variant == "ds":
        assert set(metrics) == {"loss", "loss_normal", "loss_pgd"}
        assert metrics["loss"].item() == pytest.approx(
            0.5 * metrics["loss_normal"].item() + 0.5 * metrics["loss_pgd"].item(), rel=1e-6)


def test_acl_attack_train_mode_flag():
    torch.manual_seed(0)
    cfg, m = _cfg(attack_train_mode=True)
    method = build_method(cfg, m, torch.device("cpu"))
    rec = _RouteRecorder(method.encoder)
    method.encoder.eval()
    method.make_adversarial(torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16))
    assert rec.train_calls["pgd"] == rec.calls["pgd"] > 0
    assert not method.encoder.training  # mode restored afterwards
