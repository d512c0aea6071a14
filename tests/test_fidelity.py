"""Each method against an independent reference written from its authors' code (docs/fidelity.md).

For every method, under its paper preset's settings, one training step (and, for the evaluation
protocols, one head step and the reporting attack) of the project is compared with a reference
written here from the description of the authors' code -- not by calling or copying the project's
functions -- on identical inputs, weights and random starts, in float64: the loss, the adversarial
examples, every parameter gradient, every BatchNorm running statistic after the step, and (where the
reference has its own optimiser) the parameters after two optimiser steps at two learning rates.
The inputs hold pixels at exactly 0 and 1 (where a clipped and an unclipped random start differ)
and the batches are small (6 images), so that train-mode BatchNorm statistics matter.

What is shared with the project is only the network itself (the backbone's layers and weights, a
deep copy; ACL's dual-BN backbone is routed by setting each DualBatchNorm's `route`). The input
normalisation, the projector (built here in the reference's layout and loaded with the project's
weights in order: a different layout fails to load), the batching of the forwards, the attack loop,
the losses and the optimisers are the references'.

Every reference test is paired with its key flips: the same comparison with one config key set
away from the reference must fail (`test_*_flipped_key_breaks_agreement`).

Reference files (the repositories named in docs/fidelity.md):
- DeACL: solo/methods/mocov2_distillation_AT.py (training_step, generate_training_AE);
  solo-learn bash_files/pretrain/cifar/simclr.sh, solo/methods/simclr.py, solo/losses/simclr.py,
  solo/utils/lars.py at de9b927 (the teacher); adv_finetune.py, trades/trades.py (evaluation).
- ACL: train_simCLR.py (train, PGD_contrastive), utils.py (nt_xent, pair_cosine_similarity,
  pgd_attack), models/resnet_multi_bn.py (proj_head), optimizer/lars.py, trades.py, train_trades.py.
- RoCL: rocl_train.py, attack_lib.py (RepresentationAdv, FastGradientSignUntargeted), loss.py
  (pairwise_similarity, NT_xent), models/projector.py, torchlars/lars.py and adaptive_lr.cc.
- The empirical study: cl_scl_AT.py (trainCLNet_Ro), cl_scl_PAT.py / cl_scl_FAT.py
  (trainEvalNet_Ro), attacks.py (pgd_linf, pgd_linf_end2end), loss.py (SupConLoss).
- TRADES: trades.py (trades_loss).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainer.adversarial_training as adversarial_training
import trainer.methods.acl as acl_module
import trainer.methods.deacl as deacl_module
import trainer.methods.rocl as rocl_module
import trainer.methods.supcon as supcon_module
import trainer.methods.supervised as supervised_module
from conftest import composed
from trainer.attacks import network_mode, pgd_attack, pgd_config
from trainer.checkpoint import save_model
from trainer.evaluation.protocols import (Classifier, NormalizedLogits, loss_options, protocol_loss,
                                          set_train_modes, train_attack)
from trainer.adversarial_training import ce_objective, supervised_loss
from trainer.methods import build_method
from trainer.models import build_encoder
from trainer.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64
CPU = torch.device("cpu")
B = 6
TINY = ("model.width=2",)
# the references' normalisation constants as their networks hold them: float32 tensors
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------------------- helpers

def images(n: int = B, seed: int = 0, res: int = 8) -> torch.Tensor:
    """Random images with whole rows and columns at exactly 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, res, res, generator=g, dtype=D)
    x[:, :, 0, :] = 0.0
    x[:, :, -1, :] = 1.0
    x[:, 0, :, 1] = 0.0
    x[:, 2, :, -2] = 1.0
    return x


def labels(n: int = B, classes: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    y = torch.randint(0, classes, (n,), generator=g)
    y[:2] = 0  # repeated labels: SupCon positives
    return y


def ref_normalize(stats: tuple | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if stats is None:
        return lambda x: x
    mean, std = (torch.tensor(v).to(D).view(1, 3, 1, 1) for v in stats)
    return lambda x: (x - mean) / std


@contextlib.contextmanager
def recording(module: Any):
    """Record what `module.pgd_attack` returns (the project's adversarial examples)."""
    out: list[torch.Tensor] = []
    original = module.pgd_attack

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        out.append(result)
        return result

    module.pgd_attack = wrapper
    try:
        yield out
    finally:
        module.pgd_attack = original


def set_route(module: nn.Module, route: str) -> None:
    """Select ACL's `normal` / `pgd` BN set in a dual-BN network (its batch_norm_multiple index)."""
    for m in module.modules():
        if hasattr(m, "route") and hasattr(m, "pgd"):
            m.route = route


def close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    assert a.shape == b.shape, f"{name}: shapes {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
    assert diff <= tol * scale, f"{name}: max |diff| {diff:.3g} (scale {scale:.3g})"


def close_named(what: str, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref), f"{what}: {sorted(set(ours) ^ set(ref))[:5]}"
    for k in ours:
        close(f"{what} {k}", ours[k], ref[k])


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in module.named_parameters()
            if p.requires_grad}


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.to(D) for k, v in module.named_buffers() if "running" in k or "num_batches" in k}


def linears_and_bns(module: nn.Module) -> list[Any]:
    """The Linear and BatchNorm1d layers of a projector in order; a dual BN as its (normal, pgd) pair."""
    duals = [m for m in module.modules() if hasattr(m, "normal") and hasattr(m, "pgd")]
    inner = {id(d.normal) for d in duals} | {id(d.pgd) for d in duals}
    out: list[Any] = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            out.append(m)
        elif any(m is d for d in duals):
            out.append((m.normal, m.pgd))
        elif isinstance(m, nn.BatchNorm1d) and id(m) not in inner:
            out.append(m)
    return out


def load_in_order(ref_layers: list[Any], our_layers: list[Any]) -> None:
    """Copy the project's projector weights into the reference's layers, in order; a layout that is not
    the reference's (another count, shape, bias or BN) fails here."""
    assert len(ref_layers) == len(our_layers), f"projector layout: {len(our_layers)} layers, reference {len(ref_layers)}"
    for r, o in zip(ref_layers, our_layers):
        pairs = list(zip(r, o)) if isinstance(r, tuple) else [(r, o)]
        assert not isinstance(o, tuple) or isinstance(r, tuple), "projector layout: dual BN where the reference has none"
        for rm, om in pairs:
            assert type(rm) is type(om), f"projector layout: {type(om).__name__} where the reference has {type(rm).__name__}"
            rs, os_ = rm.state_dict(), om.state_dict()
            assert set(rs) == set(os_), f"projector layout: {sorted(os_)} != reference {sorted(rs)}"
            for k in rs:
                assert rs[k].shape == os_[k].shape, f"projector layout: {k} {tuple(os_[k].shape)} != {tuple(rs[k].shape)}"
            rm.load_state_dict(os_)


def ordered_params(backbone: nn.Module, layers: list[Any]) -> list[torch.Tensor]:
    """The backbone's parameters, then the projector's layer by layer (the same order on both sides)."""
    out = list(backbone.parameters())
    for layer in layers:
        for m in (layer if isinstance(layer, tuple) else (layer,)):
            out += list(m.parameters())
    return [p.detach() for p in out]


def layer_grads(layers: list[Any]) -> list[torch.Tensor]:
    out = []
    for layer in layers:
        for m in (layer if isinstance(layer, tuple) else (layer,)):
            out += [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
    return out


def layer_buffers(layers: list[Any]) -> list[torch.Tensor]:
    out = []
    for layer in layers:
        for m in (layer if isinstance(layer, tuple) else (layer,)):
            out += [b.to(D) for b in m.buffers()]
    return out


def close_list(what: str, ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref), f"{what}: {len(ours)} != {len(ref)}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        close(f"{what}[{i}]", a, b)


def uniform_noise(x: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """The random start the engine draws after torch.manual_seed(seed): U(-eps, eps) like x."""
    torch.manual_seed(seed)
    return torch.empty_like(x).uniform_(-eps, eps)


# ------------------------------------------------------------------------------- reference pieces

def acl_nt_xent(x: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """ACL's utils.nt_xent on interleaved pairs [a0, b0, a1, b1, ...]."""
    n = x.norm(p=2, dim=1, keepdim=True)
    sim = torch.exp((x @ x.t()) / (n * n.t()).clamp(min=1e-8) / t)
    idx = torch.arange(sim.size(0))
    idx[::2] += 1
    idx[1::2] -= 1
    sim = sim[idx]
    sim = sim.diag() / (sim.sum(0) - torch.exp(torch.tensor(1 / t, dtype=sim.dtype)))
    return -torch.log(sim).mean()


def rocl_similarity(out: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """RoCL's loss.pairwise_similarity (one GPU): cosine over a detached right operand."""
    norm = out / (out.norm(dim=1).view(-1, 1) + 1e-8)
    return (1.0 / t) * torch.mm(norm, norm.t().detach())


def rocl_nt_xent(sim: torch.Tensor, kind: str) -> torch.Tensor:
    """RoCL's loss.NT_xent ('None': 2 views; 'Rep': 3 views, six diagonal blocks)."""
    n2 = len(sim)
    e = torch.exp(sim) * (1 - torch.eye(n2, dtype=sim.dtype))
    nll = -torch.log(e / (e.sum(dim=1).view(n2, 1) + 1e-8) + 1e-8)
    if kind == "None":
        n = n2 // 2
        return (1.0 / n2) * torch.sum(torch.diag(nll[0:n, n:]) + torch.diag(nll[n:, 0:n]))
    n = n2 // 3
    blocks = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    return (1.0 / n2) * sum(torch.diag(nll[i * n:(i + 1) * n, j * n:(j + 1) * n]).sum() for i, j in blocks)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor | None, temperature: float = 0.07) -> torch.Tensor:
    """The study's loss.SupConLoss (contrast_mode 'all', base_temperature 0.07)."""
    bsz = features.shape[0]
    if labels is None:
        mask = torch.eye(bsz, dtype=features.dtype)
    else:
        lab = labels.contiguous().view(-1, 1)
        mask = torch.eq(lab, lab.T).to(features.dtype)
    count = features.shape[1]
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    mask = mask.repeat(count, count)
    logits_mask = torch.ones_like(mask).scatter(1, torch.arange(bsz * count).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / 0.07) * mean_log_prob_pos).view(count, bsz).mean()


def solo_simclr_loss(z: torch.Tensor, indexes: torch.Tensor, temperature: float) -> torch.Tensor:
    """solo-learn's losses.simclr.simclr_loss_func (one GPU)."""
    z = F.normalize(z, dim=-1)
    sim = torch.exp(torch.einsum("if, jf -> ij", z, z) / temperature)
    idx = indexes.unsqueeze(0)
    pos_mask = (idx.t() == idx).fill_diagonal_(False)
    neg_mask = idx.t() != idx
    pos, neg = torch.sum(sim * pos_mask, 1), torch.sum(sim * neg_mask, 1)
    return -(torch.mean(torch.log(pos / (pos + neg))))


class ACLLars:
    """ACL's optimizer/lars.py (momentum 0.9, eta 0.001)."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.9, eta: float = 0.001):
        self.params, self.lr, self.wd, self.m, self.eta = list(params), lr, weight_decay, momentum, eta
        self.buf: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            d_p = p.grad
            w, g = torch.norm(p), torch.norm(d_p)
            local = self.eta * w / (g + self.wd * w)
            if w < 1e-15 or g < 1e-15:
                local = torch.ones_like(local)
            buf = self.buf.setdefault(id(p), torch.zeros_like(p))
            buf.mul_(self.m).add_(local * self.lr * (d_p + self.wd * p))
            p.add_(-buf)


class WrappedSGDLars:
    """torchlars' LARS (RoCL) or, with clip/exclude, solo-learn's LARSWrapper: each gradient is rescaled
    (weight decay hidden from the SGD they wrap), then torch.optim.SGD steps."""

    def __init__(self, params, lr: float, weight_decay: float, eta: float, clip: bool = False,
                 exclude_1d: bool = False, eps: float = 1e-8, momentum: float = 0.9):
        self.sgd = torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=0.0)
        self.wd, self.eta, self.clip, self.exclude, self.eps = weight_decay, eta, clip, exclude_1d, eps

    @property
    def lr(self) -> float:
        return self.sgd.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.sgd.param_groups[0]["lr"] = value

    @torch.no_grad()
    def step(self) -> None:
        for p in self.sgd.param_groups[0]["params"]:
            if p.grad is None or (self.exclude and p.ndim == 1):
                continue
            w, g = p.norm(), p.grad.norm()
            if w > 0 and g > 0:
                rate = self.eta * w / (g + self.wd * w + self.eps)
                if self.clip:
                    rate = min(rate / self.lr, 1)
            elif self.clip or self.exclude:  # solo-learn leaves such a gradient untouched
                continue
            else:
                rate = 1.0
            p.grad.add_(p, alpha=self.wd).mul_(rate)
        self.sgd.step()


def optimiser_steps(params: list[nn.Parameter], opt: Any, grads_: list[torch.Tensor], lrs: tuple[float, float],
                    set_lr: Callable[[Any, float], None]) -> list[torch.Tensor]:
    """Two optimiser steps with the same gradients at two learning rates; the parameters after."""
    for lr in lrs:
        set_lr(opt, lr)
        for p, g in zip(params, grads_):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def project_optimiser_steps(method, train_cfg, lrs) -> None:
    """Two steps of the project's optimiser (built from the method's train config), in place."""
    params = [p for p in method.encoder.parameters() if p.requires_grad]
    gs = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    opt = build_optimizer(params, train_cfg, lr=lrs[0])

    def set_lr(o, lr):
        for group in o.param_groups:
            group["lr"] = lr

    optimiser_steps(params, opt, gs, lrs, set_lr)


def reference_optimiser_steps(params: list[nn.Parameter], opt: Any, lrs) -> None:
    gs = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    optimiser_steps(params, opt, gs, lrs, lambda o, lr: setattr(o, "lr", lr))


# ------------------------------------------------------------------------------- DeACL

def check_deacl(overrides: tuple[str, ...], tmp_path) -> None:
    """mocov2_distillation_AT.py: teacher in eval mode; the student attacked in eval mode from
    x + U(-8/255, 8/255) *not clipped*, 5 steps of 2/255 on -256 sum cos(f_s(x'), f_t(x)), each projected
    to the ball and then to [0, 1]; then one train-mode forward of [x; x'] and
    -mean cos(f_s(x), f_t(x)) - 2 mean cos(f_s(x'), f_s(x))."""
    cfg = composed("preset=deacl_cifar10", *TINY, *overrides)
    torch.manual_seed(0)
    teacher = build_encoder(cfg["model"], cfg["data"]["stats"], with_projector=False)
    save_model(tmp_path / "teacher.pt", teacher, cfg["model"], cfg["data"]["stats"])
    method = build_method(cfg, cfg["method"], CPU, teacher_path=str(tmp_path / "teacher.pt"))
    method.encoder.double()
    method.teacher.double()
    ref_student, ref_teacher = copy.deepcopy(method.encoder.backbone), copy.deepcopy(method.teacher.backbone)
    norm = ref_normalize(CIFAR10)
    x = images()
    eps, alpha = 8 / 255, 2 / 255
    noise = uniform_noise(x, eps, seed=5)
    method.train()
    with recording(deacl_module) as adv:
        torch.manual_seed(5)
        loss, _ = method.training_step({"views": [x], "label": None})
    loss.backward()
    # reference
    ref_teacher.eval()
    away = ref_teacher(norm(x)).detach()
    x_cl = x.clone() + noise
    ref_student.eval()
    for _ in range(5):
        x_cl.requires_grad_()
        lc = -F.cosine_similarity(ref_student(norm(x_cl)), away, dim=1).sum() * 256
        g = torch.autograd.grad(lc, x_cl)[0]
        x_cl = x_cl.detach() + alpha * torch.sign(g.detach())
        x_cl = torch.min(torch.max(x_cl, x - eps), x + eps).clamp(0, 1)
    ref_student.train()
    out = ref_student(norm(torch.cat([x, x_cl])))
    ref_loss = -F.cosine_similarity(out[:B], away).mean() - 2.0 * F.cosine_similarity(out[B:], out[:B]).mean()
    ref_loss.backward()
    close("x_adv", adv[0], x_cl)
    close("loss", loss.detach(), ref_loss.detach())
    close_named("grad", grads(method.encoder.backbone), grads(ref_student))
    close_named("BN", bn_buffers(method.encoder.backbone), bn_buffers(ref_student))


def test_deacl_matches_reference(tmp_path):
    check_deacl((), tmp_path)


@pytest.mark.parametrize("flip", ["attack.clamp_start=true", "method.lam=1.0"])
def test_deacl_flipped_key_breaks_agreement(flip, tmp_path):
    with pytest.raises(AssertionError):
        check_deacl((flip,), tmp_path)


# ------------------------------------------------------------------------------- DeACL's teacher (solo-learn)

class SoloProjector(nn.Module):
    """solo-learn's SimCLR projector at de9b927: Linear(512, 2048)-ReLU-Linear(2048, 256), biases, no BN."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, 2048), nn.Linear(2048, 256)

    def forward(self, h):
        return self.l2(F.relu(self.l1(h)))


def check_teacher(overrides: tuple[str, ...]) -> None:
    """solo-learn's SimCLR (the teacher DeACL distils): every view its own train-mode forward,
    simclr_loss_func at temperature 0.2, LARSWrapper(eta 0.02, clip, exclude_bias_n_norm) around SGD
    (momentum 0.9, wd 1e-5)."""
    cfg = composed("preset=deacl_cifar10", *TINY, *overrides)
    torch.manual_seed(0)
    method = build_method(cfg, cfg["teacher"]["method"], CPU)
    method.encoder.double()
    ref_bb = copy.deepcopy(method.encoder.backbone)
    ref_proj = SoloProjector(ref_bb.feature_dim).double()
    load_in_order(linears_and_bns(ref_proj), linears_and_bns(method.encoder.projector))
    norm = ref_normalize(CIFAR10)
    x1, x2 = images(seed=1), images(seed=2)
    method.train()
    loss, _ = method.training_step({"views": [x1, x2], "label": None})
    loss.backward()
    ref_bb.train()
    feats = [ref_bb(norm(x1)), ref_bb(norm(x2))]
    z = torch.cat([ref_proj(f) for f in feats])
    ref_loss = solo_simclr_loss(z, torch.arange(B).repeat(2), 0.2)
    ref_loss.backward()
    close("loss", loss.detach(), ref_loss.detach())
    close_named("grad", grads(method.encoder.backbone), grads(ref_bb))
    close_list("projector grad", layer_grads(linears_and_bns(method.encoder.projector)),
               layer_grads(linears_and_bns(ref_proj)))
    close_named("BN", bn_buffers(method.encoder.backbone), bn_buffers(ref_bb))
    project_optimiser_steps(method, cfg["teacher"]["method"]["train"], (0.4, 0.2))
    ref_params = list(ref_bb.parameters()) + list(ref_proj.parameters())
    reference_optimiser_steps(ref_params, WrappedSGDLars(ref_params, lr=0.4, weight_decay=1e-5, eta=0.02, clip=True,
                                                         exclude_1d=True), (0.4, 0.2))
    close_list("params after 2 LARS steps",
               ordered_params(method.encoder.backbone, linears_and_bns(method.encoder.projector)),
               ordered_params(ref_bb, linears_and_bns(ref_proj)))


def test_deacl_teacher_matches_solo_learn():
    check_teacher(())


@pytest.mark.parametrize("flip", ["teacher.method.separate_forwards=false", "teacher.method.train.lars.exclude_1d=false",
                                  "teacher.method.train.lars.clip=false", "teacher.method.projector.bn=hidden",
                                  "teacher.method.temperature=0.5"])
def test_deacl_teacher_flipped_key_breaks_agreement(flip):
    with pytest.raises(AssertionError):
        check_teacher((flip,))


# ------------------------------------------------------------------------------- ACL (DS)

class ACLHead(nn.Module):
    """ACL's proj_head (not twoLayerProj): fc1 (bias) - bn1 - ReLU - fc2 - bn2 - ReLU - fc3 - bn3, every
    BN a batch_norm_multiple with a `normal` and a `pgd` BatchNorm1d."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(ch, ch), nn.Linear(ch, ch, bias=False), nn.Linear(ch, ch, bias=False)
        self.bns = nn.ModuleList([nn.ModuleDict({"normal": nn.BatchNorm1d(ch), "pgd": nn.BatchNorm1d(ch)})
                                  for _ in range(3)])

    def forward(self, x, route):
        x = F.relu(self.bns[0][route](self.fc1(x)))
        x = F.relu(self.bns[1][route](self.fc2(x)))
        return self.bns[2][route](self.fc3(x))

    def layers(self) -> list[Any]:
        return [self.fc1, (self.bns[0]["normal"], self.bns[0]["pgd"]), self.fc2,
                (self.bns[1]["normal"], self.bns[1]["pgd"]), self.fc3, (self.bns[2]["normal"], self.bns[2]["pgd"])]


def check_acl(overrides: tuple[str, ...]) -> None:
    """train_simCLR.py --ACL_DS: the views interleaved [x1_0, x2_0, ...]; PGD_contrastive (delta from
    U(-8/255, 8/255), not clipped, 5 steps of 2/255 on nt_xent through the pgd BNs in eval mode);
    then train-mode forwards of x_adv (pgd BNs) and x (normal BNs), loss (nt_xent + nt_xent_adv) / 2;
    LARS as optimizer/lars.py at lr 5.0, wd 1e-6."""
    cfg = composed("preset=acl_ds_cifar10", *TINY, *overrides)
    torch.manual_seed(0)
    method = build_method(cfg, cfg["method"], CPU)
    method.encoder.double()
    ref_bb = copy.deepcopy(method.encoder.backbone)
    head = ACLHead(ref_bb.feature_dim).double()
    load_in_order(head.layers(), linears_and_bns(method.encoder.projector))
    norm = ref_normalize(IMAGENET)

    def model(inp, route):
        set_route(ref_bb, route)
        return head(ref_bb(norm(inp)), route)

    x1, x2 = images(seed=1), images(seed=2)
    eps, alpha = 8 / 255, 2 / 255
    noise = uniform_noise(torch.cat([x1, x2]), eps, seed=7)
    method.train()
    with recording(acl_module) as adv:
        torch.manual_seed(7)
        loss, _ = method.training_step({"views": [x1, x2], "label": None})
    loss.backward()
    inter = lambda a, b: torch.stack([a, b], 1).view(2 * B, *a.shape[1:])  # noqa: E731
    inputs = inter(x1, x2)
    delta = inter(noise[:B], noise[B:]).clone().requires_grad_(True)
    ref_bb.eval(), head.eval()
    for _ in range(5):
        g = torch.autograd.grad(acl_nt_xent(model(inputs + delta, "pgd")), delta)[0]
        with torch.no_grad():
            delta += alpha * g.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((inputs + delta).clamp(0, 1) - inputs)
    inputs_adv = (inputs + delta).detach()
    ref_bb.train(), head.train()
    ref_loss = (acl_nt_xent(model(inputs, "normal")) + acl_nt_xent(model(inputs_adv, "pgd"))) / 2
    ref_loss.backward()
    close("x_adv", adv[0], torch.cat([inputs_adv[0::2], inputs_adv[1::2]]))
    close("loss", loss.detach(), ref_loss.detach())
    close_named("grad", grads(method.encoder.backbone), grads(ref_bb))
    close_list("projector grad", layer_grads(linears_and_bns(method.encoder.projector)), layer_grads(head.layers()))
    close_named("BN", bn_buffers(method.encoder.backbone), bn_buffers(ref_bb))
    close_list("projector BN", layer_buffers(linears_and_bns(method.encoder.projector)), layer_buffers(head.layers()))
    project_optimiser_steps(method, cfg["method"]["train"], (5.0, 2.5))
    ref_params = list(ref_bb.parameters()) + list(head.parameters())
    reference_optimiser_steps(ref_params, ACLLars(ref_params, lr=5.0, weight_decay=1e-6), (5.0, 2.5))
    close_list("params after 2 LARS steps",
               ordered_params(method.encoder.backbone, linears_and_bns(method.encoder.projector)),
               ordered_params(ref_bb, head.layers()))


def test_acl_ds_matches_reference():
    check_acl(())


@pytest.mark.parametrize("flip", ["attack.clamp_start=true", "method.train.lars.exclude_1d=true",
                                  "method.train.lars.lr_in_momentum=false", "method.projector.bn=hidden",
                                  "method.projector.layers=2"])
def test_acl_ds_flipped_key_breaks_agreement(flip):
    with pytest.raises(AssertionError):
        check_acl((flip,))


# ------------------------------------------------------------------------------- RoCL

class RoCLProjector(nn.Module):
    """RoCL's models/projector.py: Linear(512, 2048) - ReLU - Linear(2048, 128), biases, no BN."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d, 2048), nn.Linear(2048, 128)

    def forward(self, x):
        return self.linear_2(F.relu(self.linear_1(x)))


def check_rocl(overrides: tuple[str, ...]) -> None:
    """rocl_train.py + RepresentationAdv.get_loss: x = clamp(t + U(-0.0314, 0.0314), 0, 1), 7 steps of
    0.007 on NT_xent([x; t']) in eval mode (clip to [0, 1], then to the ball); then the 1/256 term from
    a train-mode forward of [x_adv; t'], the main term from a train-mode forward of [t; t'; x_adv]
    (NT_xent 'Rep'); torchlars around SGD(lr, momentum 0.9, wd 1e-6)."""
    cfg = composed("preset=rocl_cifar10", *TINY, *overrides)
    torch.manual_seed(0)
    method = build_method(cfg, cfg["method"], CPU)
    method.encoder.double()
    ref_bb = copy.deepcopy(method.encoder.backbone)
    proj = RoCLProjector(ref_bb.feature_dim).double()
    load_in_order(linears_and_bns(proj), linears_and_bns(method.encoder.projector))
    model = lambda inp: proj(ref_bb(inp))  # noqa: E731  (no input normalisation)
    x0, t, t2 = images(seed=0), images(seed=1), images(seed=2)
    eps, alpha = 0.0314, 0.007
    noise = uniform_noise(t, eps, seed=11)
    method.train()
    with recording(rocl_module) as adv:
        torch.manual_seed(11)
        loss, _ = method.training_step({"views": [x0, t, t2], "label": None})
    loss.backward()
    x = (t.clone() + noise).clamp(0, 1).requires_grad_(True)
    ref_bb.eval(), proj.eval()
    for _ in range(7):
        lo = rocl_nt_xent(rocl_similarity(model(torch.cat((x, t2)))), "None")
        g = torch.autograd.grad(lo, x)[0]
        x.data += alpha * torch.sign(g.data)
        x = torch.clamp(x, 0, 1)
        x = torch.max(torch.min(x, t + eps), t - eps)
    x_adv = x.detach()
    ref_bb.train(), proj.train()
    reg = (1.0 / 256) * rocl_nt_xent(rocl_similarity(model(torch.cat((x_adv, t2)))), "None")
    sim = rocl_similarity(model(torch.cat((t, t2, x_adv))))
    ref_loss = rocl_nt_xent(sim, "Rep") + reg
    ref_loss.backward()
    close("x_adv", adv[0], x_adv)
    close("loss", loss.detach(), ref_loss.detach())
    close_named("grad", grads(method.encoder.backbone), grads(ref_bb))
    close_list("projector grad", layer_grads(linears_and_bns(method.encoder.projector)), layer_grads(linears_and_bns(proj)))
    close_named("BN", bn_buffers(method.encoder.backbone), bn_buffers(ref_bb))
    project_optimiser_steps(method, cfg["method"]["train"], (1.5, 0.75))
    ref_params = list(ref_bb.parameters()) + list(proj.parameters())
    reference_optimiser_steps(ref_params, WrappedSGDLars(ref_params, lr=1.5, weight_decay=1e-6, eta=0.001), (1.5, 0.75))
    close_list("params after 2 LARS steps",
               ordered_params(method.encoder.backbone, linears_and_bns(method.encoder.projector)),
               ordered_params(ref_bb, linears_and_bns(proj)))


def test_rocl_matches_reference():
    check_rocl(())


@pytest.mark.parametrize("flip", ["method.attack.clamp_start=false", "method.separate_forwards=false",
                                  "method.train.lars.exclude_1d=true", "method.projector.bn=hidden",
                                  "method.attack.steps=5", "method.attack.alpha=0.00784", "method.sum_positives=false"])
def test_rocl_flipped_key_breaks_agreement(flip):
    with pytest.raises(AssertionError):
        check_rocl((flip,))


# ------------------------------------------------------------------------------- the study: adversarial CL / SCL

@pytest.fixture(scope="module")
def study_trials():
    """The trials of `python -m tune.study study=study_cifar10` (tiny width), by flip."""
    from tune.study import compose_study

    cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def get(overrides: tuple[str, ...] = ()) -> dict[str, Any]:
        if overrides not in cache:
            cache[overrides] = compose_study(["study=study_cifar10", "output_dir=/tmp/rssl-fidelity", *TINY,
                                              "study.run=[SCL]", *overrides])["trials"]
        return cache[overrides]

    return get


class StudyMLP(nn.Module):
    """The study's MLP: Linear(2048, 2048) - ReLU - Linear(2048, 100), biases, no BN (CLNet normalises)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, 100)

    def forward(self, h):
        return F.normalize(self.b(F.relu(self.a(h))), dim=1)


def check_study_cl(trials, overrides: tuple[str, ...], use_labels: bool = True) -> None:
    """cl_scl_AT.py trainCLNet_Ro + attacks.pgd_linf: delta = 0; 5 steps, each a train-mode forward of x0
    (the un-augmented image) and of x0 + delta, SupConLoss, delta += 0.01 sign(grad), clipped to the
    8/255 ball and [0, 1]; then train-mode forwards of x0, x0_adv, x1, x2 in that order,
    loss = SupCon([z(x0), z(x0_adv)]) + SupCon([z(x1), z(x2)])."""
    cfg = trials(overrides)["SCL-adversarial"]
    if not use_labels:
        cfg = copy.deepcopy(cfg)
        cfg["method"]["use_labels"] = False
    torch.manual_seed(0)
    method = build_method(cfg, cfg["method"], CPU)
    method.encoder.double()
    ref_bb = copy.deepcopy(method.encoder.backbone)
    mlp = StudyMLP(ref_bb.feature_dim).double()
    load_in_order(linears_and_bns(mlp), linears_and_bns(method.encoder.projector))
    clnet = lambda inp: mlp(ref_bb(inp))  # noqa: E731  (ToTensor only: no normalisation)
    x0, x1, x2 = images(seed=0), images(seed=1), images(seed=2)
    y = labels()
    lab = y if use_labels else None
    method.train()
    with recording(supcon_module) as adv:
        loss, _ = method.training_step({"views": [x0, x1, x2], "label": y})
    loss.backward()
    eps, alpha = 8 / 255, 0.01
    ref_bb.train(), mlp.train()
    delta = torch.zeros_like(x0, requires_grad=True)
    for _ in range(5):
        z, z_adv = clnet(x0), clnet(x0 + delta)
        lo = supcon_loss(torch.cat([z.unsqueeze(1), z_adv.unsqueeze(1)], dim=1), lab)
        g = torch.autograd.grad(lo, delta)[0]
        with torch.no_grad():
            delta.data = (delta + alpha * g.sign()).clamp(-eps, eps)
            delta.data = torch.clamp(x0 + delta.data, 0, 1) - x0
    x_adv = (x0 + delta).detach()
    z1_x0, z2_x0 = clnet(x0), clnet(x_adv)
    loss1 = supcon_loss(torch.cat([z1_x0.unsqueeze(1), z2_x0.unsqueeze(1)], dim=1), lab)
    z1_x1, z2_x2 = clnet(x1), clnet(x2)
    loss2 = supcon_loss(torch.cat([z1_x1.unsqueeze(1), z2_x2.unsqueeze(1)], dim=1), lab)
    ref_loss = loss1 + loss2
    ref_loss.backward()
    close("x_adv", adv[0], x_adv)
    close("loss", loss.detach(), ref_loss.detach())
    close_named("grad", grads(method.encoder.backbone), grads(ref_bb))
    close_list("projector grad", layer_grads(linears_and_bns(method.encoder.projector)), layer_grads(linears_and_bns(mlp)))
    close_named("BN", bn_buffers(method.encoder.backbone), bn_buffers(ref_bb))


@pytest.mark.parametrize("use_labels", [True, False], ids=["SCL", "CL"])
def test_study_adversarial_cl_matches_reference(study_trials, use_labels):
    check_study_cl(study_trials, (), use_labels)


@pytest.mark.parametrize("flip", ["method.separate_forwards=false", "method.attack_train_mode=false",
                                  "method.attack.random_start=true", "method.adv_view=first",
                                  "method.projector.bn=hidden", "method.attack.alpha=0.00784"])
def test_study_adversarial_cl_flipped_key_breaks_agreement(study_trials, flip):
    with pytest.raises(AssertionError):
        check_study_cl(study_trials, (flip,))


# ------------------------------------------------------------------------------- heads: TRADES (AFF / ALF)

def head_model(cfg: dict, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    enc = build_encoder(cfg["model"], cfg["data"]["stats"], with_projector=False)
    return Classifier(enc, int(cfg["data"]["num_classes"]), cfg["eval"]["linear"]["head_init"]).double()


def run_head_step(cfg: dict, protocol: str, model: Classifier, x, y, seed: int):
    """The project's step of one evaluation head (trainer.evaluation.protocols' pieces)."""
    ecfg = cfg["eval"]
    full = protocol == "aff"
    for p in model.encoder.parameters():
        p.requires_grad_(full)
    set_train_modes(model, full, ecfg["bn_mode"])
    train_net = model if full else (lambda inp: model.head(model.encoder(inp)))
    with recording(adversarial_training) as adv:
        torch.manual_seed(seed)
        loss, _ = supervised_loss(protocol_loss(protocol, ecfg), model, train_net, x, y, train_attack(ecfg),
                                  **loss_options(ecfg))
    loss.backward()
    return loss.detach(), adv[0]


def trades_reference(forward, modes, x, y, noise, eps, alpha, steps, beta, forwards):
    """trades.py's trades_loss: eval mode, x_adv = x + 0.001 N(0, 1) (not clipped), `steps` steps of
    `alpha` on KL(sum), projected then clipped; back to train mode (modes("train")); logits = f(x),
    CE + beta KL(f(x_adv) || f(x)) / B with f(x) forwarded again (trades.py, DeACL: three forwards)
    or reused (ACL's trades.py: two)."""
    kl = nn.KLDivLoss(reduction="sum")
    modes("eval")
    x_adv = x.detach() + 0.001 * noise
    for _ in range(steps):
        x_adv.requires_grad_()
        lkl = kl(F.log_softmax(forward(x_adv), dim=1), F.softmax(forward(x), dim=1))
        g = torch.autograd.grad(lkl, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(g.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    modes("train")
    x_adv = x_adv.clamp(0.0, 1.0).detach()
    logits = forward(x)
    log_p_adv = F.log_softmax(forward(x_adv), dim=1)  # KLDivLoss's arguments in order: f(x_adv), then f(x)
    target = forward(x) if forwards == 3 else logits
    loss = F.cross_entropy(logits, y) + beta * (1.0 / len(x)) * kl(log_p_adv, F.softmax(target, dim=1))
    return loss, x_adv


TRADES_CASES = {  # preset, protocol -> (reference's forwards, BN mode of the encoder while the head trains)
    "deacl-aff": ("preset=deacl_cifar10", "aff", 3, "train"),
    "deacl-alf": ("preset=deacl_cifar10", "alf", 3, "train"),   # adv_finetune.py: model.train() for ALF too
    "acl-aff": ("preset=acl_ds_cifar10", "aff", 2, "train"),
}


def check_trades(case: str, overrides: tuple[str, ...]) -> None:
    preset, protocol, forwards, encoder_mode = TRADES_CASES[case]
    cfg = composed(preset, *TINY, *overrides)
    model = head_model(cfg)
    ref = copy.deepcopy(model)
    x, y = images(), labels(classes=10)
    torch.manual_seed(13)
    noise = torch.randn_like(x)
    loss, x_adv = run_head_step(cfg, protocol, model, x, y, seed=13)
    full = protocol == "aff"
    for p in ref.encoder.parameters():
        p.requires_grad_(full)
    if "acl_ds" in preset:  # train_trades.py's cvt_state_dict: the fc starts at zero
        with torch.no_grad():
            ref.head.weight.zero_()
            ref.head.bias.zero_()
    norm = ref_normalize(CIFAR10 if "deacl" in preset else IMAGENET)
    forward = lambda inp: ref.head(ref.encoder.backbone(norm(inp)))  # noqa: E731

    def modes(kind):
        ref.train(kind == "train")
        if kind == "train" and encoder_mode == "eval":
            ref.encoder.eval()

    ref_loss, ref_adv = trades_reference(forward, modes, x, y, noise, 8 / 255, 2 / 255, 10, 6.0, forwards)
    ref_loss.backward()
    close("x_adv", x_adv, ref_adv)
    close("loss", loss, ref_loss.detach())
    close_named("grad", grads(model), grads(ref))
    close_named("BN", bn_buffers(model), bn_buffers(ref))


@pytest.mark.parametrize("case", list(TRADES_CASES))
def test_trades_heads_match_reference(case):
    check_trades(case, ())


@pytest.mark.parametrize("case,flip", [
    ("deacl-aff", "eval.linear.trades_forwards=one"), ("deacl-aff", "eval.linear.trades_forwards=two"),
    ("deacl-aff", "eval.pgd.clamp_start=true"), ("deacl-alf", "eval.linear.trades_forwards=one"),
    ("deacl-alf", "eval.bn_mode=eval"), ("acl-aff", "eval.linear.trades_forwards=three"),
    ("acl-aff", "eval.linear.trades_forwards=one"), ("acl-aff", "eval.linear.head_init=default"),
])
def test_trades_heads_flipped_key_breaks_agreement(case, flip):
    with pytest.raises(AssertionError):
        check_trades(case, (flip,))


def check_supervised_trades(overrides: tuple[str, ...]) -> None:
    """method=supervised loss=trades (TRADES' train_trades_cifar10.py: 10 steps of 0.007 at 0.031; here
    the attack group's 8/255, 2/255 and method.attack.steps 10) against trades.py."""
    cfg = composed("method=supervised", "method.loss=trades", "recipe=pretrain", "attack.eps=0.03137254901960784",
                   "attack.alpha=0.00784313725490196", *TINY, *overrides)
    torch.manual_seed(0)
    method = build_method(cfg, cfg["method"], CPU)
    method.encoder.double()
    ref = copy.deepcopy(method.encoder)
    norm = ref_normalize(((0.2,) * 3, (0.3,) * 3))  # digits
    x, y = images(), labels(classes=10)
    torch.manual_seed(17)
    noise = torch.randn_like(x)
    method.train()
    with recording(adversarial_training) as adv:
        torch.manual_seed(17)
        loss, _ = method.training_step({"views": [x], "label": y})
    loss.backward()
    forward = lambda inp: ref.head(ref.backbone(norm(inp)))  # noqa: E731
    ref_loss, ref_adv = trades_reference(forward, lambda k: ref.train(k == "train"), x, y, noise, 8 / 255,
                                         2 / 255, 10, 6.0, 3)
    ref_loss.backward()
    close("x_adv", adv[0], ref_adv)
    close("loss", loss.detach(), ref_loss.detach())
    close_named("grad", grads(method.encoder), grads(ref))
    close_named("BN", bn_buffers(method.encoder), bn_buffers(ref))


def test_supervised_trades_matches_reference():
    check_supervised_trades(())


@pytest.mark.parametrize("flip", ["method.trades_forwards=one", "method.attack.steps=5"])
def test_supervised_trades_flipped_key_breaks_agreement(flip):
    with pytest.raises(AssertionError):
        check_supervised_trades((flip,))


# ------------------------------------------------------------------------------- heads: the study's partial / full AT

def check_study_head(trials, protocol: str, overrides: tuple[str, ...]) -> None:
    """cl_scl_PAT.py / cl_scl_FAT.py trainEvalNet_Ro: pgd_linf_end2end on EvalNet (logits L2-normalised),
    delta = 0, 5 steps of 0.01 at 8/255, the encoder in eval mode (partial AT) or train mode (full AT);
    then h = encoder(x), h_adv = encoder(x_adv) (separate forwards), CE(head(h)) + CE(head(h_adv))."""
    cfg = trials(overrides)["SCL-adversarial"]
    model = head_model(cfg)
    ref = copy.deepcopy(model)
    x, y = images(), labels(classes=10)
    loss, x_adv = run_head_step(cfg, protocol, model, x, y, seed=19)
    full = protocol == "aff"
    for p in ref.encoder.parameters():
        p.requires_grad_(full)
    encoder = lambda inp: ref.encoder.backbone(inp)  # noqa: E731  (no normalisation)
    evalnet = lambda inp: F.normalize(ref.head(encoder(inp)), dim=1)  # noqa: E731
    ref.encoder.train(full)
    ref.head.train()
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(5):
        g = torch.autograd.grad(nn.CrossEntropyLoss()(evalnet(x + delta), y), delta)[0]
        with torch.no_grad():
            delta.data = (delta + 0.01 * g.sign()).clamp(-8 / 255, 8 / 255)
            delta.data = torch.clamp(x + delta.data, 0, 1) - x
    ref_adv = (x + delta).detach()
    ctx = contextlib.nullcontext() if full else torch.no_grad()
    with ctx:
        h, h_adv = encoder(x), encoder(ref_adv)
    ref_loss = F.cross_entropy(ref.head(h), y) + F.cross_entropy(ref.head(h_adv), y)
    ref_loss.backward()
    close("x_adv", x_adv, ref_adv)
    close("loss", loss, ref_loss.detach())
    close_named("grad", grads(model), grads(ref))
    close_named("BN", bn_buffers(model), bn_buffers(ref))


@pytest.mark.parametrize("protocol", ["alf", "aff"], ids=["partial-AT", "full-AT"])
def test_study_heads_match_reference(study_trials, protocol):
    check_study_head(study_trials, protocol, ())


@pytest.mark.parametrize("protocol,flip", [
    ("alf", "eval.attack_normalized_logits=false"), ("alf", "eval.pgd.random_start=true"),
    ("alf", "eval.train_attack_steps=10"), ("aff", "eval.train_attack_mode=eval"),
    ("aff", "eval.attack_normalized_logits=false"), ("aff", "eval.linear.trades_forwards=one"),
])
def test_study_heads_flipped_key_breaks_agreement(study_trials, protocol, flip):
    with pytest.raises(AssertionError):
        check_study_head(study_trials, protocol, (flip,))


# ------------------------------------------------------------------------------- reporting and head-training attacks

def project_test_attack(cfg: dict, model: Classifier, x, y, seed: int, section: str = "pgd") -> torch.Tensor:
    """What measure_robustness (section pgd) or an rLE head's training (section train) attacks with."""
    ecfg = cfg["eval"]
    attacked = NormalizedLogits(model) if ecfg["attack_normalized_logits"] else model
    attack = pgd_config(ecfg["pgd"]) if section == "pgd" else train_attack(ecfg)
    torch.manual_seed(seed)
    with network_mode([model], train=False):
        return pgd_attack(x, ce_objective(attacked, y), attack)


def rocl_fgsu(forward, x, y, eps, alpha, k, noise):
    """RoCL's attack_lib.FastGradientSignUntargeted: x = clamp(x + U(-eps, eps)); k steps: x += alpha sign,
    clamp to [0, 1], project to the ball."""
    xa = torch.clamp(x.clone() + noise, 0, 1).requires_grad_(True)
    for _ in range(k):
        g = torch.autograd.grad(F.cross_entropy(forward(xa), y), xa)[0]
        xa.data += alpha * torch.sign(g.data)
        xa = torch.clamp(xa, 0, 1)
        xa = torch.max(torch.min(xa, x + eps), x - eps)
    return xa.detach()


def whitebox(forward, x, y, eps, alpha, steps, noise):
    """TRADES' / DeACL's _pgd_whitebox and ACL's utils.pgd_attack: X + U(-eps, eps), not clipped; steps of
    alpha sign(grad), projected, clipped."""
    xp = (x + noise).requires_grad_(True)
    for _ in range(steps):
        g = torch.autograd.grad(nn.CrossEntropyLoss()(forward(xp), y), xp)[0]
        eta = torch.clamp(xp.data + alpha * g.sign() - x, -eps, eps)
        xp = torch.clamp(x + eta, 0, 1.0).requires_grad_(True)
    return xp.detach()


def study_end2end(forward, x, y, eps, alpha, steps):
    """The study's attacks.pgd_linf_end2end (threat model II) on F.normalize(logits), delta = 0."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        g = torch.autograd.grad(nn.CrossEntropyLoss()(F.normalize(forward(x + delta), dim=1), y), delta)[0]
        with torch.no_grad():
            delta.data = (delta + alpha * g.sign()).clamp(-eps, eps)
            delta.data = torch.clamp(x + delta.data, 0, 1) - x
    return (x + delta).detach()


ATTACK_CASES = {  # name -> (config source, stats, section, the reference's eps, reference)
    "rocl-test": ("preset=rocl_cifar10", None, "pgd", 0.0314,
                  lambda f, x, y, n: rocl_fgsu(f, x, y, 0.0314, 0.00314, 20, n)),
    "rocl-rle-train": ("preset=rocl_cifar10", None, "train", 0.0314,
                       lambda f, x, y, n: rocl_fgsu(f, x, y, 0.0314, 0.007, 10, n)),
    "deacl-test": ("preset=deacl_cifar10", CIFAR10, "pgd", 8 / 255,
                   lambda f, x, y, n: whitebox(f, x, y, 8 / 255, 2 / 255, 20, n)),
    "acl-test": ("preset=acl_ds_cifar10", IMAGENET, "pgd", 8 / 255,
                 lambda f, x, y, n: whitebox(f, x, y, 8 / 255, 2 / 255, 20, n)),
    "study-test": ("study", None, "pgd", 4 / 255, lambda f, x, y, n: study_end2end(f, x, y, 4 / 255, 0.01, 40)),
}


def check_attack(trials, case: str, overrides: tuple[str, ...]) -> None:
    source, stats, section, eps, reference = ATTACK_CASES[case]
    cfg = trials(overrides)["SCL-adversarial"] if source == "study" else composed(source, *TINY, *overrides)
    model = head_model(cfg).eval()
    x, y = images(), labels(classes=10)
    noise = uniform_noise(x, eps, seed=23)
    ours = project_test_attack(cfg, model, x, y, seed=23, section=section)
    norm = ref_normalize(stats)
    ref = reference(lambda inp: model.head(model.encoder.backbone(norm(inp))), x, y, noise)
    close("x_adv", ours, ref)


@pytest.mark.parametrize("case", list(ATTACK_CASES))
def test_reporting_and_head_attacks_match_reference(study_trials, case):
    check_attack(study_trials, case, ())


@pytest.mark.parametrize("case,flip", [
    ("rocl-test", "eval.pgd.clamp_start=false"), ("rocl-rle-train", "eval.train_attack_alpha=null"),
    ("deacl-test", "eval.pgd.clamp_start=true"), ("acl-test", "eval.pgd.random_start=false"),
    ("study-test", "eval.pgd.random_start=true"), ("study-test", "eval.attack_normalized_logits=false"),
])
def test_reporting_attacks_flipped_key_breaks_agreement(study_trials, case, flip):
    with pytest.raises(AssertionError):
        check_attack(study_trials, case, (flip,))
