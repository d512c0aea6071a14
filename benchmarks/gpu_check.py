"""The GPU check's measurements (run by benchmarks/gpu_check.sh): DeACL / ACL-DS / RoCL steps at bf16
and fp32, eager and torch.compile, NCHW and channels_last (img/s, MFU against the GEMM peak of the
step's dtype measured in this process, peak memory), and whether a bf16 step's loss and
gradients are close to fp32's. One JSON to --out.

Imports torch, the config composer and the project's step; no FFCV and no Ray. A time budget
(--budget-s) keeps the whole check inside a GPU loan: variants left when it is spent are recorded
as skipped. `--dry-run`: CPU, a tiny model, seconds: the eager variants, and one compiled variant
(DRY_COMPILED) with torch.compile's "eager" backend: the same compile path (prepare_method,
freeze_params_in_attack's auto following compile), dynamo tracing every graph, guard and
recompile of each method's step as for inductor, but no code generated (inductor takes minutes
on CPU); the GEMM peak on a small matrix.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.mfu import gemm_peak  # noqa: E402
from benchmarks.step_throughput import build_project, machine, mfu_flops, project_step, timed_step  # noqa: E402

METHODS = ("deacl", "acl_ds", "rocl")
# (precision, channels_last, compile): eager first, then compiled bf16 (the GPU default), then fp32
VARIANTS = [(p, cl, False) for p in ("bf16", "fp32") for cl in (True, False)] + \
           [("bf16", True, True), ("fp32", True, True), ("bf16", False, True)]
# the one compiled variant the dry run traces (~2 s of dynamo per method on CPU): the GPU default
DRY_COMPILED = ("bf16", True, True)
# bf16 keeps 8 mantissa bits; through ~20 conv + BN layers the clean step's gradients measured a
# cosine of 0.90-0.95 to fp32's on the dry run's width-4 model, its loss within 0.4%
GRAD_COSINE_MIN, LOSS_REL_MAX = 0.9, 0.01


def step_args(args: argparse.Namespace, precision: str, channels_last: bool, compile_: bool) -> argparse.Namespace:
    """The step_throughput options of one variant."""
    tiny = args.dry_run
    return argparse.Namespace(model="resnet18", width=4 if tiny else 0, proj_hidden_dim=32 if tiny else 0,
                              batch=args.batch or (8 if tiny else 512), res=16 if tiny else 32,
                              precision=precision, channels_last=channels_last, compile=compile_,
                              compile_backend="eager" if tiny else "inductor",
                              freeze="auto", steps=args.steps or (1 if tiny else 5), rounds=1 if tiny else 3,
                              warmup=1, profile=False)


def measure(name: str, sargs: argparse.Namespace, device: torch.device, tmp: str, flops: int,
            peaks: dict[str, float]) -> dict[str, Any]:
    """img/s, MFU and peak memory of one method under one variant."""
    t0 = time.perf_counter()
    row = timed_step(name, sargs, device, tmp, flops, peaks[sargs.precision])
    row["seconds_with_warmup"] = time.perf_counter() - t0
    if sargs.compile:
        row["compile_backend"] = sargs.compile_backend
    return row


def grads_of_one_step(name: str, sargs: argparse.Namespace, device: torch.device, tmp: str,
                      views: list[torch.Tensor], attack: bool) -> tuple[float, torch.Tensor]:
    """(loss, every encoder gradient flattened) of one project step from the same initial weights
    (TrainStep clears the gradients before its backward, so they are this step's). attack=False:
    the step on the clean views (0 PGD steps), so only the arithmetic differs between precisions."""
    method, cfg, labels = build_project(name, sargs, device, tmp)
    if not attack:
        method.attack = dataclasses.replace(method.attack, steps=0)
    step, n_views = project_step(method, cfg, labels, device)
    torch.manual_seed(5)  # the same attack start in both precisions
    metrics = step([v.clone() for v in views[:n_views]])
    grads = torch.cat([p.grad.float().flatten() for p in method.encoder.parameters() if p.grad is not None])
    return float(metrics["loss"]), grads


def bf16_vs_fp32(name: str, args: argparse.Namespace, device: torch.device, tmp: str) -> dict[str, Any]:
    """A bf16 step's loss and gradients against fp32's: same weights, batch and attack start. The
    verdict is on the step without the attack: with it, bf16 flips the sign of near-zero input
    gradients, PGD takes other steps and the two steps see different x_adv (reported too)."""
    base = step_args(args, "fp32", True, False)
    g = torch.Generator().manual_seed(2)
    views = [torch.rand(base.batch, 3, base.res, base.res, generator=g).to(device) for _ in range(3)]
    row: dict[str, Any] = {}
    for attack in (False, True):
        loss32, g32 = grads_of_one_step(name, base, device, tmp, views, attack)
        loss16, g16 = grads_of_one_step(name, step_args(args, "bf16", True, False), device, tmp, views, attack)
        row["with_attack" if attack else "clean"] = {
            "loss_fp32": loss32, "loss_bf16": loss16, "loss_rel_diff": abs(loss16 - loss32) / max(abs(loss32), 1e-12),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)),
            "grad_rel_norm_diff": float((g16 - g32).norm() / g32.norm().clamp_min(1e-30))}
    clean = row["clean"]
    row["ok"] = bool(clean["grad_cosine"] >= GRAD_COSINE_MIN and clean["loss_rel_diff"] <= LOSS_REL_MAX)
    return row


def write(out: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))


def cuda_tests(log: str) -> dict[str, Any]:
    """The CUDA-only tests' result, as gpu_check.sh ran them (its exit status and pytest's summary)."""
    if not log or not Path(log).exists():
        return {"ran": False}
    lines = [ln for ln in Path(log).read_text().splitlines() if ln.strip()]
    return {"ran": True, "rc": int(os.environ.get("GPU_CHECK_TESTS_RC", "-1")), "summary": lines[-1] if lines else ""}


def variant_key(precision: str, channels_last: bool, compile_: bool) -> str:
    return f"{precision}_{'channels_last' if channels_last else 'nchw'}_{'compile' if compile_ else 'eager'}"


def skip_reason(args: argparse.Namespace, variant: tuple[str, bool, bool], elapsed_s: float) -> str:
    """Why a variant is not measured ('' when it is)."""
    if args.dry_run and variant[2] and variant != DRY_COMPILED:
        return f"dry run: only {variant_key(*DRY_COMPILED)} is traced"
    if elapsed_s > args.budget_s:
        return f"time budget ({args.budget_s:.0f} s) spent"
    return ""


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out: dict[str, Any] = {"machine": machine(), "dry_run": args.dry_run, "device": str(device),
                           "note": "fp32 convolutions use TF32 (torch.backends.cudnn.allow_tf32, torch's default)",
                           "gemm_peak_flop_s": {p: gemm_peak(device, dt, n=256 if args.dry_run else 0)
                                                for p, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))},
                           "cuda_tests": cuda_tests(args.tests_log), "steps": {}, "bf16_vs_fp32": {}}
    print(f"# GEMM peak bf16 {out['gemm_peak_flop_s']['bf16'] / 1e12:.2f} TFLOP/s, fp32 "
          f"{out['gemm_peak_flop_s']['fp32'] / 1e12:.2f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in METHODS:
            out["bf16_vs_fp32"][name] = bf16_vs_fp32(name, args, device, tmp)
            print(f"bf16 vs fp32 {name}: {out['bf16_vs_fp32'][name]}", flush=True)
        flops = {name: mfu_flops(name, step_args(args, "fp32", False, False), device, tmp) for name in METHODS}
        out["flops_per_step"] = flops
        for variant in VARIANTS:
            key = variant_key(*variant)
            for name in METHODS:
                why = skip_reason(args, variant, time.perf_counter() - start)
                row = {"skipped": why} if why else measure(name, step_args(args, *variant), device, tmp, flops[name],
                                                           out["gemm_peak_flop_s"])
                out["steps"].setdefault(key, {})[name] = row
                write(out, args.out)  # after every row: a check cut short still leaves its figures
                print(f"{key:28s} {name:7s} " + (row["skipped"] if "skipped" in row else
                      f"{row['img_s']:9.1f} img/s  MFU {row['mfu']:.3f}  peak {row['peak_memory_mib']:.0f} MiB"),
                      flush=True)
    out["seconds"] = time.perf_counter() - start
    out["ok"] = all(v["ok"] for v in out["bf16_vs_fp32"].values()) and out["cuda_tests"].get("rc", 0) == 0
    write(out, args.out)
    print(f"# wrote {args.out} ({out['seconds']:.0f} s); bf16 close to fp32: {out['ok']}", flush=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, one compiled variant traced: seconds")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no new variant after this many seconds (one compiled variant takes 1-2 min more)")
    p.add_argument("--tests-log", default="", help="pytest's log of the CUDA-only tests (gpu_check.sh)")
    p.add_argument("--batch", type=int, default=0, help="images per step (0: 512; dry run 8)")
    p.add_argument("--steps", type=int, default=0, help="steps per timed round (0: 5; dry run 1)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.exit(2, "gpu_check: no CUDA device visible to this torch; --dry-run runs the check on CPU\n")
    return args


if __name__ == "__main__":
    result = run(parse_args())
    # a dry run checks that the script works; the verdict on a tiny CPU model is only reported
    sys.exit(0 if result["ok"] or result["dry_run"] else 1)
