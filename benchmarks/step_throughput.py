"""Images/s of the DeACL, ACL-DS and RoCL training steps: this project's step vs a plain reference.

The *project* side is exactly what a worker runs per batch: `build_method` ->
`trainer.worker.prepare_method` (channels_last, torch.compile when asked) -> `trainer.worker.TrainStep`
(autocast, `method.training_step`, backward, the configured optimiser). The *reference* side
(benchmarks/reference_steps.py) is the same step as each paper's own code writes it, written from
the authors' repositories and sharing no code with this project: fp32, NCHW, the authors' batch
layouts and forward passes, the teacher (DeACL) with autograd on, RoCL's attack re-forwarding its
target at every step, ACL's PGD calling `loss.backward()` (every parameter gradient computed at
every attack step, then zeroed), the authors' loss formulations, plain `torch.optim.SGD` or the
papers' LARS (ACL's optimizer/lars.py, torchlars for RoCL). tests/test_benchmarks.py checks that
they compute what the project's code computes.
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
import yaml  # noqa: E402

from benchmarks.reference_steps import ACLDSStep, DeACLStep, RoCLStep  # noqa: E402

from trainer.checkpoint import save_model  # noqa: E402
from trainer.methods import build_method  # noqa: E402
from trainer.models import build_encoder  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.worker import TrainStep, prepare_method  # noqa: E402

CONF = ROOT / "conf"
# benchmark name -> (method config, attack config, method overrides)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deacl": ("deacl", "pgd5_linf", {}),
    "acl_ds": ("acl", "pgd5_linf", {"variant": "ds"}),
    "rocl": ("rocl", "rocl_pgd7", {}),
}


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

    attack = {"eps": method.attack.eps, "alpha": method.attack.alpha, "steps": method.attack.steps}
    lr = scaled_lr(mcfg["train"])
    if method_name == "deacl":
        reference = DeACLStep(init, ref_teacher, mcfg, attack, lr)
    elif method_name == "acl":
        reference = ACLDSStep(init, mcfg, attack, lr)
    else:
        reference = RoCLStep(init, mcfg, attack, lr)
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
