"""Pipeline efficiency: images/s of full training divided by images/s of the bare step.

*Full training* is the real thing: `trainer.recipes.run_train_stage` with
`trainer.train_loop.pretrain_loop` on the digits .beton (FFCV loader, Ray Train worker, DDP
preparation, metrics all-reduce, kNN monitor, checkpoint written and reported every epoch,
progress line). An epoch's span runs from the end of the previous epoch's report to the end of
this epoch's `ray.train.report`, so it includes everything the loop does per epoch.
*Bare step* is `trainer.step.TrainStep` on preloaded random tensors of the same shape, in the same
worker process (same device, same torch threads), with its own copy of the method.

The two are interleaved: after each epoch's report the worker runs one bare measurement of the
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _bare_runner(cfg: dict[str, Any], stage: dict[str, Any]):
    """A second copy of the method + optimiser on preloaded tensors, in this worker's setup."""
    import torch

    from data_pipeline.write import verify_beton, beton_path
    from trainer.methods import build_method
    from trainer.optim import build_optimizer
    from trainer.step import TrainStep, prepare_method

    import ray.train.torch

    device = ray.train.torch.get_device()
    mcfg = stage["method"]
    method = build_method(cfg, mcfg, device, **stage.get("method_kwargs", {}))
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


def bench_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: `pretrain_loop` with a bare-step measurement after every epoch's report.

    Also times, per epoch, the kNN monitor (feature extraction + kNN), the checkpoint writes and
    `ray.train.report` itself (which persists the checkpoint), by wrapping those functions.
    """
    import ray.train

    import trainer.train_loop as tl

    out_file = config["stage"]["bench"]["out"]
    bare_steps = int(config["stage"]["bench"]["bare_steps"])
    original_report = ray.train.report
    parts = {"knn_s": 0.0, "checkpoint_write_s": 0.0, "loader_wait_s": 0.0}
    which = {"extract_features": "knn_s", "knn_accuracy": "knn_s",
             "save_model": "checkpoint_write_s", "atomic_save": "checkpoint_write_s"}
    originals = {name: getattr(tl, name) for name in which if hasattr(tl, name)}
    state: dict[str, Any] = {"bare": None, "epochs": [], "mark": (time.perf_counter(), time.process_time())}

    def timing(name: str, fn):
        def inner(*a: Any, **k: Any):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[which[name]] += time.perf_counter() - t
        return inner

    def report(metrics: dict[str, Any], checkpoint=None, **kwargs: Any) -> None:
        t = time.perf_counter()
        original_report(metrics, checkpoint=checkpoint, **kwargs)
        wall, cpu = time.perf_counter(), time.process_time()
        if state["bare"] is None:
            state["bare"] = _bare_runner(config["cfg"], config["stage"])
        bare_wall, bare_cpu, bare_images = state["bare"](bare_steps)
        state["epochs"].append({
            "epoch": int(metrics["epoch"]), "span_wall_s": wall - state["mark"][0],
            "span_cpu_s": cpu - state["mark"][1], "step_loop_s": float(metrics["epoch_time_s"]),
            "images": float(metrics["images_per_s"]) * float(metrics["epoch_time_s"]),
            "report_s": wall - t, **parts,
            "bare_wall_s": bare_wall, "bare_cpu_s": bare_cpu, "bare_images": bare_images,
            "knn": any(k.startswith("knn_") for k in metrics)})
        for k in parts:
            parts[k] = 0.0
        if ray.train.get_context().get_world_rank() == 0:
            Path(out_file).write_text(json.dumps(state["epochs"], indent=2))
        state["mark"] = (time.perf_counter(), time.process_time())

    for name, fn in originals.items():
        setattr(tl, name, timing(name, fn))
    build_loader = tl.build_loader

    class TimedLoader:
        """The training loader, timing how long the loop waits in next() (FFCV + float conversion)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def __len__(self) -> int:
            return len(self.inner)

        def __iter__(self):
            it = iter(self.inner)
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    parts["loader_wait_s"] += time.perf_counter() - t
                    return
                parts["loader_wait_s"] += time.perf_counter() - t
                yield batch

    def build_loader_timed(path: str, views: str, *a: Any, **k: Any):
        loader = build_loader(path, views, *a, **k)
        return loader if views == "eval" else TimedLoader(loader)

    tl.build_loader = build_loader_timed
    ray.train.report = report
    try:
        tl.pretrain_loop(config)
    finally:
        ray.train.report = original_report
        tl.build_loader = build_loader
        for name, fn in originals.items():
            setattr(tl, name, fn)


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

    from trainer.checkpoint import save_model
    from trainer.config import compose
    from trainer.models import build_encoder
    from trainer.recipes import init_ray, run_train_stage
    from data_pipeline.write import ensure_betons, verify_beton, beton_path

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
    kwargs: dict[str, Any] = {}
    if args.method == "deacl":
        teacher_path = out / "teacher.pt"
        model_cfg = compose(overrides + ["recipe=deacl"])["model"]
        save_model(teacher_path, build_encoder(model_cfg, "digits", with_projector=False), model_cfg, "digits")
        overrides += [f"teacher.checkpoint={teacher_path}", "recipe=pretrain"]
        kwargs["teacher_path"] = str(teacher_path)
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
    stage = {"name": "bench", "method": cfg["method"], "method_kwargs": kwargs,
             "bench": {"out": str(result_file), "bare_steps": bare_steps}}  # pretrain_loop ignores "bench"
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
