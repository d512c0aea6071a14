"""The speed options keep every algorithm as it is: what the attack computes, what a step syncs,
what freezing, channels_last, the fused optimiser and the compile fallback change (nothing)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_MODEL, composed
from tests.test_methods import batch_for, make
from trainer.attacks import PGDConfig, frozen_parameters, network_mode, pgd_attack
from trainer.checkpoint import save_model
from trainer.losses import deacl_attack_objective
from trainer.methods import build_method
from trainer.models import build_encoder
from trainer.optim import build_optimizer
from trainer.worker import TrainStep, prepare_method

MODEL = {"arch": "resnet18", "width": 4, "stem_padding": 1, "proj_hidden_dim": 32, "proj_output_dim": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class OpSpy(TorchDispatchMode):
    """Counts convolution/BN backward output masks and host syncs (`_local_scalar_dense`)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: collections.Counter = collections.Counter()
        self.host_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks[("conv", tuple(args[-1]))] += 1
        elif func is torch.ops.aten.native_batch_norm_backward.default:
            self.masks[("bn", tuple(args[-1]))] += 1
        elif func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                      torch.ops.aten.masked_select.default):  # .item()/bool(t), and ops that sync on CUDA
            self.host_syncs += 1
        return func(*args, **(kwargs or {}))


def _deacl(tmp_path, steps: int = 2, **cfg_extra):
    cfg = {**composed(*TINY_MODEL), **cfg_extra}
    cfg["attack"].update(eps=8 / 255, alpha=2 / 255, steps=steps)
    torch.manual_seed(0)
    teacher = build_encoder(MODEL, "digits", with_projector=False)
    save_model(tmp_path / "t.pt", teacher, MODEL, "digits")
    return cfg, build_method(cfg, cfg["method"], torch.device("cpu"), teacher_path=str(tmp_path / "t.pt"))


@pytest.mark.parametrize("freeze", [True, False])
def test_attack_computes_input_gradients_only(tmp_path, freeze):
    _, method = _deacl(tmp_path, freeze_params_in_attack=freeze)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        f_t = method.teacher(x)
    with method.attack_mode(train=False), OpSpy() as spy:
        pgd_attack(x, lambda xa: deacl_attack_objective(method.encoder(xa), f_t), PGDConfig(steps=1))
    # ResNet-18: 20 convolutions, 20 BNs, each backward once, input gradient only (no weight kernels)
    assert spy.masks == {("conv", (True, False, False)): 20, ("bn", (True, False, False)): 20}
    assert all(p.grad is None for p in method.encoder.parameters())
    assert all(p.requires_grad for p in method.encoder.parameters())


def test_frozen_parameters_restores_exactly_and_on_error():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.weight.requires_grad_(False)  # a frozen helper stays frozen afterwards
    with frozen_parameters([a, b, a]):
        assert not any(p.requires_grad for p in (*a.parameters(), *b.parameters()))
    assert a.weight.requires_grad and a.bias.requires_grad and b.bias.requires_grad
    assert not b.weight.requires_grad
    with pytest.raises(KeyError), frozen_parameters([a]):
        raise KeyError
    assert a.weight.requires_grad
    with frozen_parameters([a], enabled=False):
        assert a.weight.requires_grad


@pytest.mark.parametrize("name,overrides", [("acl", {"variant": "ds"}), ("acl", {"variant": "a2s"}),
                                            ("rocl", {}), ("supcon", {"adversarial": True})])
def test_freezing_does_not_change_the_attack(name, overrides):
    torch.manual_seed(0)
    _, method = make(name, **overrides)
    batch = batch_for(method)
    outs = []
    for freeze in (True, False):
        method.freeze_params_in_attack = freeze
        torch.manual_seed(1)
        if name == "acl":
            outs.append(torch.cat(method.make_adversarial(*batch["views"])))
        elif name == "rocl":
            outs.append(method.make_adversarial(*batch["views"][1:]))
        else:
            outs.append(method.make_adversarial(batch["views"][0], batch["label"]))
    assert torch.equal(outs[0], outs[1])
    assert all(p.requires_grad for p in method.encoder.parameters())


@pytest.mark.parametrize("name,overrides", [("deacl", {}), ("acl", {"variant": "ds"}), ("rocl", {})])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_step_has_no_host_sync(tmp_path, name, overrides, channels_last):
    cfg_extra = {"precision": "fp32", "channels_last": channels_last}
    if name == "deacl":
        cfg, method = _deacl(tmp_path, **cfg_extra)
        train = method.mcfg["train"]
    else:
        cfg, method = make(name, **overrides)
        cfg.update(cfg_extra)
        train = {**method.mcfg["train"], "batch_size": 8}
    prepare_method(method, cfg, torch.device("cpu"))
    if channels_last:
        conv = method.encoder.backbone.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(method.encoder.parameters(), train)
    step = TrainStep(method, opt, None, cfg, torch.device("cpu"))
    method.train()
    batch = batch_for(method)
    step(dict(batch))  # first step: optimiser state is created
    with OpSpy() as spy:
        metrics = step(dict(batch))
    assert spy.host_syncs == 0, "a training step synchronised with the host"
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    assert torch.isfinite(metrics["loss"])
    assert all(p.grad is not None for p in method.encoder.parameters() if p.requires_grad)


def test_channels_last_gives_the_same_step(tmp_path):
    # No attack steps: PGD's sign(grad) turns last-bit differences of two conv algorithms into
    # different adversarial images; the forward/backward arithmetic itself must agree.
    x = torch.rand(8, 3, 16, 16)
    losses, grads = [], []
    for cl in (False, True):
        cfg, method = _deacl(tmp_path, steps=0, channels_last=cl, precision="fp32")
        prepare_method(method, cfg, torch.device("cpu"))
        fmt = torch.channels_last if cl else torch.contiguous_format
        assert method.teacher.backbone.conv1.weight.is_contiguous(memory_format=fmt)
        method.train()
        torch.manual_seed(3)
        loss, _ = method.training_step({"views": [x.contiguous(memory_format=fmt)], "label": None})
        loss.backward()
        losses.append(loss.detach())
        grads.append(method.encoder.backbone.conv1.weight.grad.clone())
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_fused_sgd_matches_the_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    grads = [torch.randn_like(p) for p in params]
    out = []
    for fused in ("auto", False):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = build_optimizer(ps, {"optimizer": "sgd", "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4,
                                   "fused": fused})
        assert bool(opt.defaults.get("fused")) == (fused == "auto")
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        out.append(ps)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*out))


def test_compile_without_compiler_runs_eagerly(tmp_path, monkeypatch):
    import trainer.worker.step as step_mod

    monkeypatch.setattr(step_mod, "compile_available", lambda device, backend="inductor": (False, "no compiler (test)"))
    cfg, method = _deacl(tmp_path, compile=True)
    lines = []
    prepare_method(method, cfg, torch.device("cpu"), log=lines.append)
    assert lines and "ignored" in lines[0]
    assert getattr(method.encoder, "_compiled_call_impl", None) is None


def test_freeze_auto_follows_compile(tmp_path):
    assert not _deacl(tmp_path)[1].freeze_params_in_attack
    assert _deacl(tmp_path, compile=True)[1].freeze_params_in_attack
    assert not _deacl(tmp_path, compile=True, freeze_params_in_attack=False)[1].freeze_params_in_attack


def test_network_mode_and_freeze_compose_in_attack_mode(tmp_path):
    _, method = _deacl(tmp_path, freeze_params_in_attack=True)
    method.train()
    with method.attack_mode(train=False):
        assert not method.encoder.training
        assert not any(p.requires_grad for p in method.encoder.parameters())
    assert method.encoder.training and all(p.requires_grad for p in method.encoder.parameters())
    with network_mode([method.encoder], train=False):
        assert all(p.requires_grad for p in method.encoder.parameters())


@pytest.mark.parametrize("override,key", [("compile=fast", "compile"), ("channels_last=maybe", "channels_last"),
                                          ("freeze_params_in_attack=1", "freeze_params_in_attack")])
def test_speed_options_are_validated(tmp_path, override, key):
    from conf import ConfigError, compose

    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: allowed"):
        compose([f"output_dir={tmp_path}", override])
    compose([f"output_dir={tmp_path}", "compile=max-autotune", "channels_last=false"])
