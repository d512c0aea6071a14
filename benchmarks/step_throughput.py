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
import functools
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

from benchmarks.mfu import conv_rate, count_flops, gemm_peak, peak_memory_mib, reset_peak_memory, sync, time_breakdown  # noqa: E402
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
    # --mfu only (no reference step): standard SSL and supervised TRADES
    "simclr": ("simclr", "pgd5_linf", {}),
    "trades": ("supervised", "pgd5_linf", {"loss": "trades"}),
}
REFERENCED = ("deacl", "acl_ds", "rocl")
MFU_METHODS = ("simclr", "deacl", "acl_ds", "rocl", "trades")


# ----------------------------------------------------------------------------- setup

def make_cfg(args: argparse.Namespace, method_name: str, attack: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The composed config of one side: the method's and the attack option's values (not the demo
    preset's 16/255), the benchmark's model, batch and speed options. The speed options are
    top-level values: set on the composed base and validated (schema and rules, as a Tune trial's
    point), so a base is composed once however many variants use it; the run name is derived again."""
    from conf import default_run_name, validate

    ov = [f"model={args.model}", f"method={method_name}", f"attack={attack}", "data.stats=cifar10",
          f"method.train.batch_size={args.batch}", *(f"method.{k}={v}" for k, v in overrides.items())]
    if args.width:
        ov.append(f"model.width={args.width}")
    if args.proj_hidden_dim:
        ov.append(f"model.proj_hidden_dim={args.proj_hidden_dim}")
    ov += ["recipe=pretrain", "teacher.checkpoint=null"] if method_name != "deacl" else []
    cfg = validate({**copy.deepcopy(_composed_cfg(tuple(ov), attack)), "precision": args.precision,
                    "channels_last": args.channels_last, "compile": args.compile,
                    "freeze_params_in_attack": args.freeze})
    cfg["run_name"] = default_run_name(cfg)
    return cfg


@functools.lru_cache(maxsize=None)
def _composed_cfg(overrides: tuple[str, ...], attack: str) -> dict[str, Any]:
    """Composed once per distinct base: a Hydra composition costs ~0.3 s of CPU, and the GPU
    check builds each method's step in 5 variants, several times (it was most of its dry run)."""
    from conf import compose
    from conf.schema import Attack

    cfg = compose(list(overrides))
    cfg["attack"] = Attack.model_validate(yaml.safe_load((CONF / "attack" / f"{attack}.yaml").read_text()) or {}).model_dump()
    return cfg


def build_project(name: str, args: argparse.Namespace, device: torch.device, tmp: str):
    """(method, composed config, project step on a list of views, number of views): exactly what a
    worker runs per batch. The labels (TRADES) are fixed random classes."""
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
    labels = torch.randint(0, int(cfg["data"]["num_classes"]), (args.batch,)).to(device)
    return method, cfg, labels


def project_step(method, cfg: dict[str, Any], labels: torch.Tensor, device: torch.device,
                 backend: str = "inductor"):
    """prepare_method (layout, compile with `backend`) + TrainStep, as a function of the views."""
    prepare_method(method, cfg, device, backend=backend)
    step = TrainStep(method, build_optimizer(method.encoder.parameters(), cfg["method"]["train"]), None, cfg, device)
    method.train()

    def project(views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return step({"views": list(views), "label": labels})

    return project, {"weak": 1, "two_view": 2, "three_view": 3}[method.views]


def build_sides(name: str, args: argparse.Namespace, device: torch.device, tmp: str):
    """(project step, reference step, number of views) for one method, same initial weights."""
    from trainer.optim import scaled_lr

    method, cfg, labels = build_project(name, args, device, tmp)
    mcfg = cfg["method"]
    # the reference's copies, taken before any layout change or compilation: plain fp32 NCHW
    init = copy.deepcopy(method.encoder)
    ref_teacher = copy.deepcopy(method.teacher) if name == "deacl" else None
    project, n_views = project_step(method, cfg, labels, device, args.compile_backend)
    attack = {"eps": method.attack.eps, "alpha": method.attack.alpha, "steps": method.attack.steps}
    lr = scaled_lr(mcfg["train"])
    if name == "deacl":
        reference = DeACLStep(init, ref_teacher, mcfg, attack, lr)
    elif name == "acl_ds":
        reference = ACLDSStep(init, mcfg, attack, lr)
    else:
        reference = RoCLStep(init, mcfg, attack, lr)
    return project, reference, n_views


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


def setup(args: argparse.Namespace) -> tuple[torch.device, dict[str, Any]]:
    """Threads, device, cudnn autotune; prints and returns the machine line."""
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
          f"precision {args.precision}, channels_last {args.channels_last}, "
          f"compile {args.compile}{f' ({args.compile_backend})' if args.compile else ''}, "
          f"freeze params in attack {args.freeze}; {args.rounds} rounds x {args.steps} steps", flush=True)
    return device, info


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.mfu:
        return run_mfu(args)
    device, info = setup(args)
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


def step_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """The dtype the step's matmuls run in: bf16 under autocast (auto on CUDA, or asked), else fp32."""
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def step_views(args: argparse.Namespace, n_views: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(args.batch, 3, args.res, args.res, generator=g).to(device) for _ in range(n_views)]


def mfu_flops(name: str, args: argparse.Namespace, device: torch.device, tmp: str) -> int:
    """FLOPs of one project step, counted on an eager build (compiled code hides ops from the counter)."""
    method, cfg, labels = build_project(name, argparse.Namespace(**{**vars(args), "compile": False}), device, tmp)
    step, n_views = project_step(method, cfg, labels, device)
    views = step_views(args, n_views, device)
    return count_flops(lambda: step(views))


def timed_step(name: str, args: argparse.Namespace, device: torch.device, tmp: str, flops: int,
               peak: float) -> dict[str, Any]:
    """img/s, FLOP/s, MFU against `peak` and peak memory of the project step (median of the rounds)."""
    method, cfg, labels = build_project(name, args, device, tmp)
    step, n_views = project_step(method, cfg, labels, device, args.compile_backend)
    views = step_views(args, n_views, device)
    reset_peak_memory(device)
    timed(step, [views], max(args.warmup, 1), device)  # warm-up (and compilation)
    sec = statistics.median(timed(step, [views], args.steps, device)[0] / args.steps for _ in range(args.rounds))
    row = {"flops_per_step": flops, "step_s": sec, "img_s": args.batch / sec, "flop_s": flops / sec,
           "peak_flop_s": peak, "mfu": flops / sec / peak, "peak_memory_mib": peak_memory_mib(device),
           "attack_steps": int(getattr(getattr(method, "attack", None), "steps", 0) or 0)}
    if args.profile:
        row["profile"] = time_breakdown(lambda: step(views), device)
    return row


def mfu_one(name: str, args: argparse.Namespace, device: torch.device, tmp: str, peak: float) -> dict[str, Any]:
    return timed_step(name, args, device, tmp, mfu_flops(name, args, device, tmp), peak)


def run_mfu(args: argparse.Namespace) -> dict[str, Any]:
    """--mfu: each step's FLOPs, achieved FLOP/s against the GEMM peak measured in this process."""
    device, info = setup(args)
    dtype = step_dtype(args, device)
    peak, conv = gemm_peak(device, dtype), conv_rate(device, dtype)
    print(f"# {dtype} GEMM peak {peak / 1e9:.1f} GFLOP/s, 3x3 convolution (256 ch, 16x16) {conv / 1e9:.1f} "
          f"GFLOP/s (measured now)", flush=True)
    results: dict[str, Any] = {"machine": info, "dtype": str(dtype), "gemm_peak_flop_s": peak,
                               "conv3x3_flop_s": conv, "methods": {}}
    mem = "GPU max allocated" if device.type == "cuda" else "process max RSS"
    print(f"{'method':8s} {'GFLOP/step':>10s} {'s/step':>7s} {'img/s':>8s} {'GFLOP/s':>8s} {'MFU':>5s} "
          f"{mem + ' (MiB)':>24s}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            row = mfu_one(name, args, device, tmp, peak)
            results["methods"][name] = row
            print(f"{name:8s} {row['flops_per_step'] / 1e9:10.1f} {row['step_s']:7.3f} {row['img_s']:8.1f} "
                  f"{row['flop_s'] / 1e9:8.1f} {row['mfu']:5.2f} {row['peak_memory_mib']:24.0f}", flush=True)
            if "profile" in row:
                p = row["profile"]
                print(f"#   time: dense ops {p['dense_share']:.0%}, other ops {p['other_ops_share']:.0%}, "
                      f"outside ops {p['outside_ops_share']:.0%}; top: "
                      + ", ".join(f"{k} {v:.2f}s" for k, v in p["top_ops"][:5]), flush=True)
    results["gemm_peak_end_flop_s"] = gemm_peak(device, dtype)
    info["loadavg_end"] = list(os.getloadavg())
    print(f"# GEMM peak at end {results['gemm_peak_end_flop_s'] / 1e9:.1f} GFLOP/s; load avg at end "
          f"{' '.join(f'{v:.2f}' for v in info['loadavg_end'])}", flush=True)
    for name, row in results["methods"].items():
        print(f"mfu {name} {row['mfu']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mfu", action="store_true",
                   help="model FLOP utilisation of the project's steps (no reference), against a GEMM peak")
    p.add_argument("--profile", action="store_true", help="--mfu: where one step's time goes (torch.profiler)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help=f"default: {' '.join(REFERENCED)}; with --mfu {' '.join(MFU_METHODS)} "
                        "(simclr and trades have no reference step)")
    p.add_argument("--model", default="resnet18", help="conf/model/<name>.yaml")
    p.add_argument("--width", type=int, default=None,
                   help="ResNet base width (64 = the papers'; 0: the yaml's); default 16, with --mfu the yaml's")
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
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="--compile's backend; aot_eager and eager trace the graphs and generate no code")
    p.add_argument("--freeze", default="auto", type=lambda s: s if s == "auto" else s.lower() == "true",
                   help="project side: freeze_params_in_attack, auto (with --compile) | true | false")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = list(MFU_METHODS if args.mfu else REFERENCED)
    elif not args.mfu and set(args.methods) - set(REFERENCED):
        p.error(f"--methods {' '.join(sorted(set(args.methods) - set(REFERENCED)))}: no reference step; "
                f"allowed without --mfu: {' '.join(REFERENCED)}")
    if args.width is None:
        args.width = 0 if args.mfu else 16
    return args


if __name__ == "__main__":
    run(parse_args())
