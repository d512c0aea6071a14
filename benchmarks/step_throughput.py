"""Images/s of the DeACL, ACL-DS and RoCL training steps: this project's step vs a plain reference.

The *project* side is exactly what a worker runs per batch: `build_method` ->
`trainer.worker.prepare_method` (channels_last, torch.compile when asked) -> `trainer.worker.TrainStep`
(autocast, `method.training_step`, backward, the configured optimiser). The *reference* side is
the same step written the straightforward way, as the papers' code does it: fp32, NCHW, one
forward pass per input batch as the authors' code batches them, the teacher (DeACL) / the attack
target (RoCL) computed with autograd on, and PGD calling `loss.backward()` so that every parameter
gradient is computed at every attack step and then zeroed; the optimiser is plain
`torch.optim.SGD` (for-loop on CPU, its default) or the references' per-parameter LARS (ACL's
optimizer/lars.py, torchlars for RoCL). These references are written from the authors' code,
not from this project's: tests/test_benchmarks.py checks that they agree with it.
Same model class and initial weights, same batch, same preloaded tensors (no loader), same device
and threads.

The two sides run interleaved in one process (project, reference, reference, project, ...),
`--steps` steps per timed run, `--rounds` runs each; the figures are medians, the ratio is the
median of per-round ratios, so load on a shared machine hits both sides alike. Every run is
timed twice: wall clock (`wall`, what a user sees) and this process's CPU time (`cpu`): with
`--threads 1` on a machine shared with other jobs the CPU time is the stable measure of the
work each side does (wall time there mostly measures the scheduler).

    python benchmarks/step_throughput.py                                   # CPU, width 16, batch 128
    python benchmarks/step_throughput.py --width 64 --batch 512 --device cuda --precision bf16

`--json PATH` writes the figures. See docs/performance.md for measured numbers.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from trainer.attacks import PGDConfig  # noqa: E402
from trainer.checkpoint import save_model  # noqa: E402
from trainer.methods import build_method  # noqa: E402
from trainer.models import build_encoder  # noqa: E402
from trainer.models.dual_bn import bn_route  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.worker import TrainStep, prepare_method  # noqa: E402

CONF = ROOT / "conf"
# benchmark name -> (method config, attack config, method overrides)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deacl": ("deacl", "pgd5_linf", {}),
    "acl_ds": ("acl", "pgd5_linf", {"variant": "ds"}),
    "rocl": ("rocl", "rocl_pgd7", {}),
}


# ----------------------------------------------------------------------------- the reference

def ref_pgd(model: torch.nn.Module, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
            a: PGDConfig, clamp_start: bool = False) -> torch.Tensor:
    """L-inf PGD as ACL's PGD_contrastive / DeACL's generate_training_AE write it: a delta parameter
    started at U(-eps, eps) *without* clipping x + delta (RoCL's RepresentationAdv clips it:
    `clamp_start`), loss.backward() (parameter grads too), delta += alpha sign(grad), delta clipped
    to the ball and x + delta to [0, 1]."""
    x = x.detach()
    delta = torch.rand_like(x) * 2 * a.eps - a.eps
    if clamp_start:
        delta = (x + delta).clamp(0, 1) - x
    delta.requires_grad_(True)
    for _ in range(a.steps):
        loss = objective(x + delta).sum()
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            delta += a.alpha * delta.grad.sign()
            delta.clamp_(-a.eps, a.eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
        delta.grad = None
    model.zero_grad()
    return (x + delta).detach()


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2B anchors, the usual cross-entropy formulation."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.t() / t).masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


def ref_multi_positive(views: list[torch.Tensor], t: float, detach_right: bool) -> torch.Tensor:
    """NT-Xent with every view of an image a positive (RoCL), mean over positives."""
    b, v = views[0].shape[0], len(views)
    z = F.normalize(torch.cat(views), dim=1)
    right = z.detach() if detach_right else z
    eye = torch.eye(v * b, dtype=torch.bool, device=z.device)
    logp = (z @ right.t() / t).masked_fill(eye, float("-inf")).log_softmax(dim=1)
    ids = torch.arange(b, device=z.device).repeat(v)
    pos = (ids[:, None] == ids[None, :]) & ~eye
    return -(logp.masked_fill(~pos, 0.0).sum(1) / (v - 1)).mean()


class RefLARS(torch.optim.Optimizer):
    """ACL's optimizer/lars.py, one parameter at a time: local_lr = eta |w| / (|g| + wd |w|) (1 where a
    norm is below 1e-15), every parameter (biases and BN too); the momentum buffer accumulates
    lr * local_lr * (g + wd w), starting from zeros, and the parameter moves by -buffer."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0005,
                 eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            wd, lr = group["weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = float(p.norm()), float(p.grad.norm())
                local = 1.0 if w_norm < 1e-15 or g_norm < 1e-15 else group["eta"] * w_norm / (g_norm + wd * w_norm)
                state = self.state[p]
                if "buf" not in state:
                    state["buf"] = torch.zeros_like(p)
                state["buf"].mul_(group["momentum"]).add_(lr * local * (p.grad + wd * p))
                p.sub_(state["buf"])


class RefTorchLARS:
    """torchlars' LARS (RoCL): around torch.optim.SGD with its weight decay hidden, each gradient
    becomes adaptive_lr * (g + wd w), adaptive_lr = eta |w| / (|g| + wd |w| + eps) (1 where |w| or |g|
    is 0), every parameter; then SGD's momentum step."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, eps: float = 1e-8,
                 trust_coef: float = 0.001) -> None:
        self.sgd = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
        self.wd, self.eps, self.trust = weight_decay, eps, trust_coef
        self.param_groups = self.sgd.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.sgd.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = float(p.norm()), float(p.grad.norm())
                rate = self.trust * w_norm / (g_norm + self.wd * w_norm + self.eps) if w_norm > 0 and g_norm > 0 else 1.0
                p.grad.add_(p, alpha=self.wd).mul_(rate)
        self.sgd.step()


def ref_optimizer(params, train: dict[str, Any], lr: float, kind: str = "acl"):
    """The reference's optimiser: SGD, or LARS as ACL's code (kind=acl) or torchlars (RoCL) has it."""
    wd, mom = float(train.get("weight_decay", 0.0)), float(train.get("momentum", 0.9))
    if train["optimizer"] == "lars":
        if kind == "torchlars":
            return RefTorchLARS(params, lr=lr, momentum=mom, weight_decay=wd)
        return RefLARS(params, lr=lr, momentum=mom, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd)


class RefDeACL:
    def __init__(self, student, teacher, mcfg, attack: PGDConfig, lr: float) -> None:
        self.student, self.teacher, self.attack = student, teacher, attack
        self.lam = float(mcfg["lam"])
        for p in self.teacher.parameters():  # the reference never freezes its teacher
            p.requires_grad_(True)
        self.opt = ref_optimizer(student.parameters(), mcfg["train"], lr)

    def __call__(self, views: list[torch.Tensor]) -> None:
        (x,) = views
        self.teacher.eval()
        f_t = self.teacher(x)  # autograd on, as in the reference
        self.student.eval()
        x_adv = ref_pgd(self.student, x, lambda xa: -F.cosine_similarity(self.student(xa), f_t.detach()),
                        self.attack)
        self.student.train()
        f_all = self.student(torch.cat([x, x_adv]))  # one forward of [x; x'] (image_CAT)
        f_s, f_adv = f_all[:x.shape[0]], f_all[x.shape[0]:]
        loss = -F.cosine_similarity(f_s, f_t).mean() - self.lam * F.cosine_similarity(f_adv, f_s).mean()
        self.opt.zero_grad()
        loss.backward()  # also runs back through the teacher
        self.opt.step()
        self.teacher.zero_grad()


class RefACLDS:
    def __init__(self, model, mcfg, attack: PGDConfig, lr: float) -> None:
        self.model, self.attack = model, attack
        self.t = float(mcfg.get("temperature", 0.5))
        self.w = [float(v) for v in mcfg.get("stream_weights", [0.5, 0.5])]
        self.opt = ref_optimizer(model.parameters(), mcfg["train"], lr)

    def _proj(self, x: torch.Tensor, route: str) -> torch.Tensor:
        with bn_route(self.model, route):
            return self.model(x, project=True)[1]

    def __call__(self, views: list[torch.Tensor]) -> None:
        x1, x2 = views
        b = x1.shape[0]
        self.model.eval()

        def joint(xa: torch.Tensor) -> torch.Tensor:
            z = self._proj(xa, "pgd")
            return ref_nt_xent(z[:b], z[b:], self.t)

        x_adv = ref_pgd(self.model, torch.cat([x1, x2]), joint, self.attack)
        self.model.train()
        z_n = self._proj(torch.cat([x1, x2]), "normal")
        z_p = self._proj(x_adv, "pgd")
        loss = self.w[0] * ref_nt_xent(z_n[:b], z_n[b:], self.t) + self.w[1] * ref_nt_xent(z_p[:b], z_p[b:], self.t)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


class RefRoCL:
    def __init__(self, model, mcfg, attack: PGDConfig, lr: float) -> None:
        self.model, self.attack = model, attack
        self.t, self.lam = float(mcfg.get("temperature", 0.5)), float(mcfg.get("lam", 256.0))
        self.detach_right = bool(mcfg.get("detach_right", True))
        self.scale = 2.0 if mcfg.get("sum_positives", True) else 1.0
        self.opt = ref_optimizer(model.parameters(), mcfg["train"], lr, kind="torchlars")

    def __call__(self, views: list[torch.Tensor]) -> None:
        _, x_t, x_t2 = views
        b = x_t.shape[0]
        self.model.eval()
        target = self.model(x_t2, project=True)[1]  # autograd on, as in the reference
        x_adv = ref_pgd(self.model, x_t,
                        lambda xa: ref_multi_positive([self.model(xa, project=True)[1], target.detach()],
                                                      self.t, self.detach_right), self.attack, clamp_start=True)
        self.model.train()
        z_r = self.model(torch.cat([x_adv, x_t2]), project=True)[1]  # get_loss's own forward: [x_adv; t']
        z = self.model(torch.cat([x_t, x_t2, x_adv]), project=True)[1]
        loss = (self.scale * ref_multi_positive([z[:b], z[b:2 * b], z[2 * b:]], self.t, self.detach_right)
                + ref_multi_positive([z_r[:b], z_r[b:]], self.t, self.detach_right) / self.lam)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


# ----------------------------------------------------------------------------- setup

def make_cfg(args: argparse.Namespace, method_name: str, attack: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The composed config of one side: the method's and the attack option's values (not the demo
    preset's 16/255), the benchmark's model, batch and speed options."""
    from conf import compose
    from conf.schema import Attack

    ov = [f"model={args.model}", f"method={method_name}", f"attack={attack}", "data.stats=cifar10",
          f"method.train.batch_size={args.batch}", f"precision={args.precision}",
          f"channels_last={str(args.channels_last).lower()}", f"compile={str(args.compile).lower()}",
          f"freeze_params_in_attack={str(args.freeze).lower()}",
          *(f"method.{k}={v}" for k, v in overrides.items())]
    if args.width:
        ov.append(f"model.width={args.width}")
    if args.proj_hidden_dim:
        ov.append(f"model.proj_hidden_dim={args.proj_hidden_dim}")
    cfg = compose(ov + (["recipe=pretrain", "teacher.checkpoint=null"] if method_name != "deacl" else []))
    cfg["attack"] = Attack.model_validate(yaml.safe_load((CONF / "attack" / f"{attack}.yaml").read_text()) or {}).model_dump()
    return cfg


def build_sides(name: str, args: argparse.Namespace, device: torch.device, tmp: str):
    """(project step, reference step, number of views) for one method, same initial weights."""
    method_name, attack_name, overrides = METHODS[name]
    cfg = make_cfg(args, method_name, attack_name, overrides)
    mcfg = cfg["method"]
    kwargs = {}
    torch.manual_seed(0)
    if method_name == "deacl":
        teacher = build_encoder(cfg["model"], "cifar10", with_projector=False)
        kwargs["teacher_path"] = os.path.join(tmp, "teacher.pt")
        save_model(kwargs["teacher_path"], teacher, cfg["model"], "cifar10")
    method = build_method(cfg, mcfg, device, **kwargs)
    # the reference's copies, taken before any layout change or compilation: plain fp32 NCHW
    init = copy.deepcopy(method.encoder)
    ref_teacher = copy.deepcopy(method.teacher) if method_name == "deacl" else None
    prepare_method(method, cfg, device)
    step = TrainStep(method, build_optimizer(method.encoder.parameters(), mcfg["train"]), None, cfg, device)
    method.train()

    def project(views: list[torch.Tensor]) -> None:
        step({"views": list(views), "label": None})

    from trainer.optim import scaled_lr

    attack = method.attack
    lr = scaled_lr(mcfg["train"])
    if method_name == "deacl":
        reference = RefDeACL(init, ref_teacher, mcfg, attack, lr)
    elif method_name == "acl":
        reference = RefACLDS(init, mcfg, attack, lr)
    else:
        reference = RefRoCL(init, mcfg, attack, lr)
    n_views = {"weak": 1, "two_view": 2, "three_view": 3}[method.views]
    return project, reference, n_views


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[list[torch.Tensor]], None], batches: list[list[torch.Tensor]], steps: int,
          device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for `steps` steps."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        fn(batches[i % len(batches)])
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg_start": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the workers set it; both sides profit
    info = machine()
    info.update(device=str(device), args=vars(args))
    print(f"# {info['cpu']} | {info['cores']} cores | torch {info['torch']} | {info['threads']} threads | "
          f"device {device}{' (' + info['gpu'] + ')' if device.type == 'cuda' else ''} | "
          f"load avg {' '.join(f'{v:.2f}' for v in info['loadavg_start'])}", flush=True)
    print(f"# width {args.width or 'model default'} ({args.model}), batch {args.batch}, {args.res}x{args.res}, "
          f"precision {args.precision}, channels_last {args.channels_last}, compile {args.compile}, "
          f"freeze params in attack {args.freeze}; {args.rounds} rounds x {args.steps} steps", flush=True)
    results: dict[str, Any] = {"machine": info, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            project, reference, n_views = build_sides(name, args, device, tmp)
            g = torch.Generator().manual_seed(1)
            batches = [[torch.rand(args.batch, 3, args.res, args.res, generator=g).to(device)
                        for _ in range(n_views)] for _ in range(2)]
            for fn in (project, reference):  # warm-up: kernels, allocator, cudnn autotune, compile
                if args.warmup:
                    timed(fn, batches, args.warmup, device)
            got: dict[str, list[tuple[float, float]]] = {"p": [], "r": []}
            for r in range(args.rounds):
                order = [("p", project), ("r", reference)]
                if r % 2:
                    order.reverse()
                for k, fn in order:
                    got[k].append(timed(fn, batches, args.steps, device))
            imgs = args.batch * args.steps
            row: dict[str, Any] = {"images_per_run": imgs}
            for clock, i in (("wall", 0), ("cpu", 1)):
                tp, tr = [t[i] for t in got["p"]], [t[i] for t in got["r"]]
                ratios = [b / a for a, b in zip(tp, tr)]
                row[clock] = {"project_img_s": imgs / statistics.median(tp),
                              "reference_img_s": imgs / statistics.median(tr),
                              "ratio": statistics.median(ratios), "ratios": ratios,
                              "project_s": tp, "reference_s": tr}
            results["methods"][name] = row
            for clock in ("wall", "cpu"):
                c = row[clock]
                print(f"{name:8s} {clock:4s} project {c['project_img_s']:9.1f} img/s | reference "
                      f"{c['reference_img_s']:9.1f} img/s | ratio {c['ratio']:.2f}x "
                      f"(per round: {' '.join(f'{v:.2f}' for v in c['ratios'])})", flush=True)
            del project, reference, batches
    info["loadavg_end"] = list(os.getloadavg())
    print(f"# load avg at end {' '.join(f'{v:.2f}' for v in info['loadavg_end'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--model", default="resnet18", help="conf/model/<name>.yaml")
    p.add_argument("--width", type=int, default=16, help="ResNet base width (64 = the papers'; 0: the yaml's)")
    p.add_argument("--proj-hidden-dim", type=int, default=0, help="projector hidden width (0: the yaml's)")
    p.add_argument("--batch", type=int, default=128, help="images per step (per device)")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=5, help="timed runs per side, interleaved")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="project side (auto: bf16 on CUDA, fp32 on CPU); the reference is always fp32")
    p.add_argument("--channels-last", default="auto", type=lambda s: s if s == "auto" else s.lower() == "true",
                   help="project side: auto | true | false")
    p.add_argument("--compile", action="store_true", help="project side: torch.compile the networks")
    p.add_argument("--freeze", default="auto", type=lambda s: s if s == "auto" else s.lower() == "true",
                   help="project side: freeze_params_in_attack, auto (with --compile) | true | false")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
