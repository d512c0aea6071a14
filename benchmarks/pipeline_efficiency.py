"""Pipeline efficiency: images/s of full training divided by images/s of the bare step.

*Full training* is the real thing: `trainer.launch.run_train_stage` with
`trainer.worker.pretrain_loop` on the digits .beton (FFCV loader, Ray Train worker, DDP
preparation, metrics all-reduce, kNN monitor, checkpoint written and reported every epoch,
progress line). An epoch's span runs from the end of the previous epoch's report to the end of
this epoch's `ray.train.report`, so it includes everything the loop does per epoch.
*Bare step* is `trainer.worker.TrainStep` on preloaded random tensors of the same shape, in the same
worker process (same device, same torch threads), with its own copy of the method.

The measurement is an epoch hook (`BenchHook`, trainer/worker/hooks.py's interface): the loop itself
reports where each epoch's time went (step loop, waiting for batches, each hook, checkpoint write,
report). After each epoch's report the hook runs one bare measurement of the
same number of steps (that time is excluded from the training clock), so machine load hits both
alike. The first `--warmup-epochs` epochs are excluded explicitly: FFCV compiles its pipelines
with numba on their first iteration (train loader in epoch 1, the monitor's eval loaders at the
first kNN), and the first steps allocate. Efficiency = median over the remaining epochs of
(epoch images / epoch span) / (bare images / bare time), on wall clock and on process CPU time;
also for all remaining epochs together (what a run gets, kNN epochs included).
The epoch is also split into the step loop (loader + steps, `epoch_time_s`) and the epilogue
(kNN monitor, checkpoint writes, report), which is where lost time shows up.

    python benchmarks/pipeline_efficiency.py                         # DeACL, width 8, batch 128, digits
    python benchmarks/pipeline_efficiency.py --knn-every 0           # without the kNN monitor

See docs/performance.md for measured numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.worker import EpochHook  # noqa: E402


def _bare_runner(cfg: dict[str, Any], stage: dict[str, Any]):
    """A second copy of the method + optimiser on preloaded tensors, in this worker's setup."""
    import torch

    from data_pipeline.write import beton_path, verify_beton
    from trainer.methods import build_method
    from trainer.optim import build_optimizer
    from trainer.worker import TrainStep, prepare_method

    import ray.train.torch

    device = ray.train.torch.get_device()
    mcfg = stage["method"]
    method = build_method(cfg, mcfg, device, **stage["method_kwargs"])
    prepare_method(method, cfg, device, log=lambda _: None)
    step = TrainStep(method, build_optimizer(method.encoder.parameters(), mcfg["train"]), None, cfg, device)
    res = int(verify_beton(str(beton_path(cfg["data"], "train")), check_hash=False)["resolution"])
    b = int(mcfg["train"]["batch_size"]) // int(cfg["cluster"]["num_workers"])
    n_views = {"weak": 1, "two_view": 2, "three_view": 3}[method.views]
    g = torch.Generator().manual_seed(0)
    batches = [[torch.rand(b, 3, res, res, generator=g).to(device) for _ in range(n_views)] for _ in range(2)]
    label = torch.zeros(b, dtype=torch.long, device=device)

    def run(steps: int) -> tuple[float, float, int]:
        method.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics: dict[str, Any] = {}
        for i in range(steps):
            metrics = step({"views": list(batches[i % 2]), "label": label})
        if metrics:
            float(metrics["loss"])  # one sync at the end, as the loop's per-epoch report does
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, time.process_time() - c0, steps * b

    return run


class BenchHook(EpochHook):
    """After every epoch's report: record where the epoch's time went, then time the bare step."""

    name = "bench"

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg, self.stage = config["cfg"], config["stage"]
        self.out_file, self.bare_steps = self.stage["bench"]["out"], int(self.stage["bench"]["bare_steps"])
        self.bare = None
        self.epochs: list[dict[str, Any]] = []
        self.mark = (time.perf_counter(), time.process_time())

    def after_report(self, epoch: int, report: Mapping[str, Any], timings: Mapping[str, Any]) -> None:
        import ray.train

        wall, cpu = time.perf_counter(), time.process_time()
        if self.bare is None:
            self.bare = _bare_runner(self.cfg, self.stage)
        bare_wall, bare_cpu, bare_images = self.bare(self.bare_steps)
        self.epochs.append({
            "epoch": epoch + 1, "span_wall_s": wall - self.mark[0], "span_cpu_s": cpu - self.mark[1],
            "step_loop_s": timings["step_loop_s"], "images": timings["images"], "report_s": timings["report_s"],
            "knn_s": timings["hooks_s"].get("knn", 0.0), "checkpoint_write_s": timings["checkpoint_write_s"],
            "loader_wait_s": timings["data_wait_s"], "bare_wall_s": bare_wall, "bare_cpu_s": bare_cpu,
            "bare_images": bare_images, "knn": any(k.startswith("knn_") for k in report)})
        if ray.train.get_context().get_world_rank() == 0:
            Path(self.out_file).write_text(json.dumps(self.epochs, indent=2))
        self.mark = (time.perf_counter(), time.process_time())


def bench_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: the real pre-training loop with the timing hook added."""
    from trainer.worker import pretrain_loop

    pretrain_loop(config, extra_hooks=[BenchHook(config)])


def summarise(epochs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    kept = [e for e in epochs if e["epoch"] > warmup]
    if not kept:
        raise SystemExit(f"no epoch after the {warmup} warm-up epoch(s): raise --epochs")
    rows = []
    for e in kept:
        pipe_wall = e["images"] / e["span_wall_s"]
        bare_wall = e["bare_images"] / e["bare_wall_s"]
        rows.append({
            "epoch": e["epoch"], "pipeline_img_s": pipe_wall, "bare_img_s": bare_wall,
            "efficiency_wall": pipe_wall / bare_wall,
            "efficiency_cpu": (e["images"] / e["span_cpu_s"]) / (e["bare_images"] / e["bare_cpu_s"]),
            "step_loop_efficiency": (e["images"] / e["step_loop_s"]) / bare_wall,
            "epilogue_share": 1 - e["step_loop_s"] / e["span_wall_s"],
            "knn_share": e.get("knn_s", 0.0) / e["span_wall_s"],
            "loader_wait_share": e.get("loader_wait_s", 0.0) / e["span_wall_s"],
            "checkpoint_share": (e.get("checkpoint_write_s", 0.0) + e.get("report_s", 0.0)) / e["span_wall_s"],
            "knn": e["knn"]})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k not in ("epoch", "knn")}
    # The whole run as a user gets it: kNN epochs and the monitor's first compilation included.
    overall = ((sum(e["images"] for e in kept) / sum(e["span_wall_s"] for e in kept))
               / (sum(e["bare_images"] for e in kept) / sum(e["bare_wall_s"] for e in kept)))
    return {"epochs": rows, "median": med, "overall_efficiency_wall": overall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="deacl", help="conf/method/<name>.yaml")
    p.add_argument("--width", type=int, default=8, help="ResNet-18 base width")
    p.add_argument("--batch", type=int, default=128, help="global batch size")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--warmup-epochs", type=int, default=1, help="excluded from the figures (numba compile, allocator)")
    p.add_argument("--threads", type=int, default=2, help="cluster.cpus_per_worker: torch and FFCV threads")
    p.add_argument("--knn-every", type=int, default=5, help="monitor.knn_every (the default config: 5)")
    p.add_argument("--bare-steps", type=int, default=0, help="steps per bare measurement (0: one epoch's worth)")
    p.add_argument("--attack-steps", type=int, default=0, help="attack.steps override (0: the method's default)")
    p.add_argument("--output-dir", default="", help="where betons and Ray results go (default: a temp dir)")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. precision=bf16")
    args = p.parse_args(argv)

    from conf import compose
    from data_pipeline.write import beton_path, ensure_betons, verify_beton
    from trainer.checkpoint import save_model
    from trainer.launch import init_ray, run_train_stage
    from trainer.models import build_encoder
    from trainer.recipes import Stage, initial_artifacts, stage_payload

    import benchmarks.pipeline_efficiency as this  # workers import the loop by reference

    tmp = tempfile.TemporaryDirectory() if not args.output_dir else None
    out = Path(args.output_dir or tmp.name).absolute()
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"output_dir={out}", "data=digits", f"method={args.method}", f"model.width={args.width}",
                 f"method.train.batch_size={args.batch}", f"method.train.epochs={args.epochs}",
                 "method.train.warmup_epochs=0", f"cluster.cpus_per_worker={args.threads}",
                 f"monitor.knn_every={args.knn_every}", "cluster.num_workers=1"]
    if args.attack_steps:
        overrides.append(f"attack.steps={args.attack_steps}")
    if args.method == "deacl":
        teacher_path = out / "teacher.pt"
        model_cfg = compose(overrides + ["recipe=deacl"])["model"]
        save_model(teacher_path, build_encoder(model_cfg, "digits", with_projector=False), model_cfg, "digits")
        overrides += [f"teacher.checkpoint={teacher_path}", "recipe=pretrain"]
    cfg = compose(overrides + list(args.overrides))
    ensure_betons(cfg["data"], list(cfg["data"]["splits"]), log=lambda s: None)
    n_train = int(verify_beton(str(beton_path(cfg["data"], "train")), check_hash=False)["count"])
    bare_steps = args.bare_steps or max(1, n_train // args.batch)  # one epoch's worth (drop_last)

    from benchmarks.step_throughput import machine

    info = machine()
    info["threads"] = args.threads
    print(f"# {info['cpu']} | {info['cores']} cores | torch {info['torch']} | worker threads {args.threads} | "
          f"load avg {' '.join(f'{v:.2f}' for v in info['loadavg_start'])}", flush=True)
    print(f"# {args.method}, width {args.width}, batch {args.batch}, {args.epochs} epochs "
          f"({args.warmup_epochs} warm-up excluded), knn_every {args.knn_every}, "
          f"{n_train} train images, {bare_steps} bare steps per measurement", flush=True)
    init_ray(cfg)
    result_file = out / "pipeline_epochs.json"
    stage = stage_payload(cfg, Stage("bench", "pretrain", method=cfg["method"]), initial_artifacts(cfg))
    stage["bench"] = {"out": str(result_file), "bare_steps": bare_steps}  # read by BenchHook only
    run_train_stage(cfg, stage, this.bench_loop, f"bench-{int(time.time())}")
    epochs = json.loads(result_file.read_text())
    summary = summarise(epochs, args.warmup_epochs)
    info["loadavg_end"] = list(os.getloadavg())
    for r in summary["epochs"]:
        print(f"epoch {r['epoch']}: pipeline {r['pipeline_img_s']:7.1f} img/s | bare step {r['bare_img_s']:7.1f} img/s"
              f" | efficiency wall {r['efficiency_wall']:.2f} cpu {r['efficiency_cpu']:.2f} | step loop alone "
              f"{r['step_loop_efficiency']:.2f} (waiting for batches {100 * r['loader_wait_share']:.1f}% of the epoch) "
              f"| epilogue {100 * r['epilogue_share']:.1f}% of the epoch: kNN "
              f"{100 * r['knn_share']:.1f}%, checkpoint write + report {100 * r['checkpoint_share']:.1f}%", flush=True)
    m = summary["median"]
    print(f"median: efficiency wall {m['efficiency_wall']:.2f}, cpu {m['efficiency_cpu']:.2f} "
          f"(pipeline {m['pipeline_img_s']:.1f} img/s, bare {m['bare_img_s']:.1f} img/s); "
          f"all kept epochs together: {summary['overall_efficiency_wall']:.2f}; "
          f"load avg at end {' '.join(f'{v:.2f}' for v in info['loadavg_end'])}", flush=True)
    results = {"machine": info, "args": vars(args), **summary, "raw": epochs}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    import ray

    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
