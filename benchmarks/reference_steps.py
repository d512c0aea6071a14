"""The benchmark's reference training steps, written the way each paper's own code writes them.

Nothing here comes from this project's code: no project import, no shared helper. Each piece
follows its authors' repository (read, then written anew):
- DeACL (pantheon5100/DeACL, `generate_training_AE`): x_cl = x + U(-eps, eps), unclipped;
  `torch.autograd.grad(-cos(f(x_cl), f_t).sum(), x_cl)`; x_cl = min(max(x_cl + a sign(g), x - eps),
  x + eps), then clamp to [0, 1]. The teacher's features come from a forward with autograd on.
- ACL (VITA-Group/Adversarial-Contrastive-Learning, `PGD_contrastive`, `nt_xent`, optimizer/lars.py):
  a `delta` Parameter started at U(-eps, eps) (`rand_like * 2 eps - eps`), `loss.backward()` (every
  parameter gradient too, zeroed again by `model.zero_grad()`), delta clamped to the ball and
  x + delta to [0, 1]; the two views interleaved in one batch (x1[0], x2[0], x1[1], ...) and NT-Xent
  written on that layout with `exp` sums; LARS with a per-parameter local rate, lr inside momentum.
- RoCL (Kim-Minseon/RoCL, `RepresentationAdv.get_loss`, loss.py, torchlars): x = clamp(x +
  U(-eps, eps), 0, 1); each step forwards [x; target] through the network (eval mode) and takes
  the input gradient of NT-Xent on that pair; x += a sign(g), clamp to [0, 1], then project to the
  ball; NT-Xent from `pairwise_similarity` (right operand detached) and the block-diagonal sum
  of `NT_xent` (the three-view `Rep` form for the main loss); torchlars' LARS around SGD.
The dual-BN route of ACL-DS is set on the model's `route` attributes directly (ACL passes the BN
name to its model's forward). tests/test_benchmarks.py checks that these steps compute what the
project's do.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- attacks

def deacl_attack(features: Callable[[Tensor], Tensor], image: Tensor, away_target: Tensor, eps: float,
                 step_size: float, steps: int) -> Tensor:
    """DeACL's generate_training_AE: maximise -cos(f(x_cl), target)."""
    x_cl = image.clone().detach()
    x_cl = x_cl + torch.zeros_like(image).uniform_(-eps, eps)
    for _ in range(steps):
        x_cl.requires_grad_()
        with torch.enable_grad():
            loss = -F.cosine_similarity(features(x_cl), away_target, dim=1).sum()
        grad = torch.autograd.grad(loss, x_cl)[0]
        x_cl = x_cl.detach() + step_size * torch.sign(grad.detach())
        x_cl = torch.min(torch.max(x_cl, image - eps), image + eps)
        x_cl = torch.clamp(x_cl, 0, 1)
    return x_cl


def acl_attack(model: torch.nn.Module, loss_of: Callable[[Tensor], Tensor], inputs: Tensor, eps: float,
               alpha: float, iters: int) -> Tensor:
    """ACL's PGD_contrastive: a delta Parameter, loss.backward() through the whole model."""
    delta = torch.nn.Parameter(torch.rand_like(inputs) * eps * 2 - eps)
    for _ in range(iters):
        loss = loss_of(inputs + delta)
        model.zero_grad()
        loss.backward()
        delta.data = delta.data + alpha * delta.grad.sign()
        delta.grad = None
        delta.data = torch.clamp(delta.data, min=-eps, max=eps)
        delta.data = torch.clamp(inputs + delta.data, min=0, max=1) - inputs
    model.zero_grad()
    return (inputs + delta).detach()


def rocl_attack(loss_of: Callable[[Tensor], Tensor], original: Tensor, eps: float, alpha: float,
                max_iters: int) -> Tensor:
    """RoCL's RepresentationAdv.get_loss (loss_type sim): `loss_of(x)` forwards [x; target] itself."""
    x = original.clone() + torch.empty_like(original).uniform_(-eps, eps)
    x = torch.clamp(x, 0, 1)
    x.requires_grad = True
    with torch.enable_grad():
        for _ in range(max_iters):
            grads = torch.autograd.grad(loss_of(x), x, only_inputs=True, retain_graph=False)[0]
            x.data += alpha * torch.sign(grads.data)
            x = torch.clamp(x, 0, 1)
            x = torch.max(torch.min(x, original + eps), original - eps)
    return x.detach()


# ----------------------------------------------------------------------------- losses

def acl_nt_xent(x: Tensor, t: float = 0.5) -> Tensor:
    """ACL's nt_xent on interleaved pairs (rows 2i and 2i+1 are the two views of image i)."""
    n = x.norm(p=2, dim=1, keepdim=True)
    x = (x @ x.t()) / (n * n.t()).clamp(min=1e-8)
    x = torch.exp(x / t)
    idx = torch.arange(x.size()[0])
    idx[::2] += 1
    idx[1::2] -= 1
    x = x[idx]
    x = x.diag() / (x.sum(0) - torch.exp(torch.tensor(1 / t)))
    return -torch.log(x).mean()


def interleave(a: Tensor, b: Tensor) -> Tensor:
    """ACL's batch layout: torch.stack([a, b], dim=1) flattened, a[0], b[0], a[1], b[1], ..."""
    return torch.stack([a, b], dim=1).reshape(-1, *a.shape[1:])


def rocl_similarity(outputs: Tensor, temperature: float = 0.5, detach_right: bool = True) -> Tensor:
    """RoCL's pairwise_similarity (single GPU)."""
    b = outputs.shape[0]
    norm = outputs / (outputs.norm(dim=1).view(b, 1) + 1e-8)
    right = norm.transpose(0, 1)
    return (1.0 / temperature) * torch.mm(norm, right.detach() if detach_right else right)


def rocl_nt_xent(similarity: Tensor, n_views: int) -> Tensor:
    """RoCL's NT_xent: 2 views ('None') or 3 ('Rep'); the sum over every ordered pair of view blocks."""
    n2 = len(similarity)
    n = n2 // n_views
    e = torch.exp(similarity) * (1 - torch.eye(n2, n2, device=similarity.device))
    loss = -torch.log(e / (torch.sum(e, dim=1).view(n2, 1) + 1e-8) + 1e-8)
    total = similarity.new_zeros(())
    for i in range(n_views):
        for j in range(n_views):
            if i != j:
                total = total + torch.sum(torch.diag(loss[i * n:(i + 1) * n, j * n:(j + 1) * n]))
    return total / float(n2)


# ----------------------------------------------------------------------------- optimisers

class AclLARS(torch.optim.Optimizer):
    """ACL's optimizer/lars.py: local_lr = eta |w| / (|g| + wd |w|), 1 where a norm is below 1e-15;
    buf = m buf + lr local_lr (g + wd w), w -= buf; every parameter."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0005,
                 eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            wd, momentum, eta, lr = group["weight_decay"], group["momentum"], group["eta"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad.data
                weight_norm, grad_norm = torch.norm(p.data), torch.norm(d_p)
                local_lr = (eta * weight_norm / (grad_norm + wd * weight_norm)).reshape(1)
                local_lr[((weight_norm < 1e-15) | (grad_norm < 1e-15)).reshape(1)] = 1.0
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.data)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_((local_lr * lr) * (d_p + wd * p.data))
                p.data.add_(-buf)


class TorchLARS:
    """torchlars' LARS (RoCL's optimiser): wraps SGD, its weight decay taken out; per parameter
    g <- (g + wd w) * rate, rate = trust |w| / (|g| + wd |w| + eps) where both norms are > 0, else 1."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, eps: float = 1e-8,
                 trust_coef: float = 0.001) -> None:
        self.optim = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
        self.weight_decay, self.eps, self.trust_coef = weight_decay, eps, trust_coef
        self.param_groups = self.optim.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.optim.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_norm, grad_norm = p.data.norm(), p.grad.data.norm()
                rate = self.trust_coef * param_norm / (grad_norm + param_norm * self.weight_decay + self.eps)
                rate = torch.where((param_norm > 0) & (grad_norm > 0), rate, torch.ones_like(rate))
                p.grad.data.add_(p.data, alpha=self.weight_decay)
                p.grad.data.mul_(rate)
        self.optim.step()


def make_optimizer(params, train: dict[str, Any], lr: float, kind: str = "acl"):
    """SGD (torch's default implementation), or the paper's LARS (ACL's, or torchlars for RoCL)."""
    wd, mom = float(train.get("weight_decay", 0.0)), float(train.get("momentum", 0.9))
    if train["optimizer"] == "lars":
        if kind == "torchlars":
            return TorchLARS(params, lr=lr, momentum=mom, weight_decay=wd)
        return AclLARS(params, lr=lr, momentum=mom, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd)


# ----------------------------------------------------------------------------- steps

class DeACLStep:
    """DeACL stage 2: teacher features (autograd on), the attack, one student forward of [x; x_adv]."""

    def __init__(self, student, teacher, mcfg, attack: dict[str, float], lr: float) -> None:
        self.student, self.teacher, self.attack = student, teacher, attack
        self.lam = float(mcfg["lam"])
        for p in self.teacher.parameters():  # DeACL's code never freezes its teacher's parameters
            p.requires_grad_(True)
        self.opt = make_optimizer(student.parameters(), mcfg["train"], lr)

    def __call__(self, views: list[Tensor]) -> None:
        (x,) = views
        self.teacher.eval()
        away_target = self.teacher(x)
        self.student.eval()
        x_adv = deacl_attack(self.student, x, away_target.detach(), self.attack["eps"], self.attack["alpha"],
                             int(self.attack["steps"]))
        self.student.train()
        f_all = self.student(torch.cat([x, x_adv]))
        f_s, f_adv = f_all[:x.shape[0]], f_all[x.shape[0]:]
        loss = -F.cosine_similarity(f_s, away_target).mean() - self.lam * F.cosine_similarity(f_adv, f_s).mean()
        self.opt.zero_grad()
        loss.backward()  # runs back through the teacher too, as DeACL's code does
        self.opt.step()
        self.teacher.zero_grad()


def set_bn_route(model: torch.nn.Module, route: str) -> None:
    for m in model.modules():
        if hasattr(m, "route"):
            m.route = route


class ACLDSStep:
    """ACL with dual BN: attack through the pgd BNs, then NT-Xent on both streams."""

    def __init__(self, model, mcfg, attack: dict[str, float], lr: float) -> None:
        self.model, self.attack = model, attack
        self.t = float(mcfg.get("temperature", 0.5))
        self.w = [float(v) for v in mcfg.get("stream_weights", [0.5, 0.5])]
        self.opt = make_optimizer(model.parameters(), mcfg["train"], lr)

    def _proj(self, x: Tensor, route: str) -> Tensor:
        set_bn_route(self.model, route)
        return self.model(x, project=True)[1]

    def __call__(self, views: list[Tensor]) -> None:
        inputs = interleave(*views)
        self.model.eval()
        x_adv = acl_attack(self.model, lambda xa: acl_nt_xent(self._proj(xa, "pgd"), self.t), inputs,
                           self.attack["eps"], self.attack["alpha"], int(self.attack["steps"]))
        self.model.train()
        loss = (self.w[0] * acl_nt_xent(self._proj(inputs, "normal"), self.t)
                + self.w[1] * acl_nt_xent(self._proj(x_adv, "pgd"), self.t))
        set_bn_route(self.model, "normal")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


class RoCLStep:
    """RoCL: the attack on t(x) against t'(x), then NT-Xent over [t; t'; t_adv] + 1/lambda NT-Xent(t_adv, t')."""

    def __init__(self, model, mcfg, attack: dict[str, float], lr: float) -> None:
        self.model, self.attack = model, attack
        self.t, self.lam = float(mcfg.get("temperature", 0.5)), float(mcfg.get("lam", 256.0))
        self.detach_right = bool(mcfg.get("detach_right", True))
        # RoCL's 3-view sum counts each anchor's two positives (twice the mean over positives)
        self.main_scale = 1.0 if mcfg.get("sum_positives", True) else 0.5
        self.opt = make_optimizer(model.parameters(), mcfg["train"], lr, kind="torchlars")

    def _loss(self, inputs: Tensor, n_views: int) -> Tensor:
        output = self.model(inputs, project=True)[1]
        return rocl_nt_xent(rocl_similarity(output, self.t, self.detach_right), n_views)

    def __call__(self, views: list[Tensor]) -> None:
        _, x_t, x_t2 = views
        self.model.eval()
        x_adv = rocl_attack(lambda x: self._loss(torch.cat((x, x_t2)), 2), x_t, self.attack["eps"],
                            self.attack["alpha"], int(self.attack["steps"]))
        self.model.train()
        self.opt.zero_grad()
        reg = (1.0 / self.lam) * self._loss(torch.cat((x_adv, x_t2)), 2)  # get_loss's own forward
        loss = self.main_scale * self._loss(torch.cat((x_t, x_t2, x_adv)), 3) + reg
        loss.backward()
        self.opt.step()
