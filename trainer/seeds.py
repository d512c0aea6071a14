"""Multi-seed runs: `seeds=[0,1,2]` runs the recipe once per seed and reports mean ± std.

Each seed is the same config with `seed` set (so its run folder is the one a plain run with that
seed uses, and a finished seed is reused), run as parallel Tune trials where the cluster fits
several (trainer/grid.py). The seeds' results land in `<output_dir>/<group>/`: `results.json`
(per seed and the summary), `results.csv` (one row per model, protocol and metric: per-seed values,
mean, sample std, n) and `seeds.png` (per-seed points and mean ± std per model and protocol).
"""
from __future__ import annotations

import copy
import csv
import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping

from conf import config_hash, default_run_name
from data_pipeline.write import ensure_betons
from trainer.grid import run_recipe_grid, trials_that_fit
from trainer.launch import init_ray, use_gpu
from trainer.recipes import preflight, run_dir
from trainer.results import results_rows

METRICS = ("SA", "RA_PGD", "AA")


def seed_config(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The single-seed config of `seed` (its run name as a plain run with that seed would have)."""
    given = cfg["run_name"] != default_run_name(cfg)  # the user named the run
    one = copy.deepcopy(dict(cfg))
    one["seed"], one["seeds"] = int(seed), None
    one["run_name"] = f"{cfg['run_name']}-seed{seed}" if given else default_run_name(one)
    return one


def group_dir(cfg: Mapping[str, Any]) -> Path:
    """Where the seeds' summary lives: named by the config without its seed."""
    keep = {k: v for k, v in cfg.items() if k not in ("seed", "seeds")}
    return Path(cfg["output_dir"]) / f"seeds-{cfg['method']['name']}-{cfg['data']['name']}-{config_hash(keep)}"


def summarise(per_seed: Mapping[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (model, protocol, metric): the seeds' values, mean, sample std, n."""
    cells: dict[tuple[str, str, str], dict[int, float]] = {}
    for seed, rows in per_seed.items():
        for r in rows:
            for m in METRICS:
                if r.get(m) is not None:
                    cells.setdefault((r["model"], r["protocol"], m), {})[seed] = float(r[m])
    out = []
    for (model, protocol, metric), values in cells.items():
        v = [values[s] for s in sorted(values)]
        out.append({"model": model, "protocol": protocol, "metric": metric, "seeds": sorted(values),
                    "values": v, "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "n": len(v)})
    return out


def format_seed_table(summary: list[dict[str, Any]], pgd_steps: int) -> str:
    names = {"SA": "SA", "RA_PGD": f"RA(PGD-{pgd_steps})", "AA": "AA"}
    head = f"{'model':<12}{'protocol':<10}" + "".join(f"{names[m]:>18}" for m in METRICS) + f"{'n':>4}"
    lines = [head, "-" * len(head)]
    for model, protocol in dict.fromkeys((r["model"], r["protocol"]) for r in summary):
        cells = {r["metric"]: r for r in summary if (r["model"], r["protocol"]) == (model, protocol)}
        shown = "".join(f"{cells[m]['mean']:>10.2f} ± {cells[m]['std']:<5.2f}" if m in cells else f"{'-':>18}"
                        for m in METRICS)
        n = max(c["n"] for c in cells.values())
        lines.append(f"{model:<12}{protocol:<10}{shown}{n:>4}")
    lines.append("mean ± sample std over the seeds, in %.")
    return "\n".join(lines)


def plot_seeds(summary: list[dict[str, Any]], path: Path) -> Path:
    """Per model and protocol (x), each metric: the seeds' values as points, mean ± std as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["protocol"]) for r in summary))
    fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 2.5, 4.2), constrained_layout=True)
    for k, metric in enumerate(METRICS):
        for g, key in enumerate(groups):
            cell = next((r for r in summary if (r["model"], r["protocol"]) == key and r["metric"] == metric), None)
            if cell is None:
                continue
            x = g + (k - 1) * 0.25
            ax.errorbar([x], [cell["mean"]], yerr=[cell["std"]], fmt="s", color=f"C{k}", capsize=4, ms=7,
                        label=metric if g == 0 else None)
            ax.scatter([x + 0.07] * cell["n"], cell["values"], color=f"C{k}", s=12, alpha=0.6)
    ax.set_xticks(range(len(groups)), [f"{m}\n{p}" for m, p in groups])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")
    n = max(r["n"] for r in summary)
    ax.set_title(f"{n} seeds: points per seed, mean ± sample std")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_seed_results(folder: Path, per_seed: Mapping[int, list[dict[str, Any]]], summary: list[dict[str, Any]],
                       runs: Mapping[int, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"seeds": {str(s): {"run_dir": runs[s], "table": r}
                                                               for s, r in per_seed.items()},
                                                     "summary": summary}, indent=2))
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "protocol", "metric", "seeds", "values", "mean", "std", "n"])
        w.writeheader()
        w.writerows({**r, "seeds": " ".join(map(str, r["seeds"])), "values": " ".join(f"{v:.4f}" for v in r["values"])}
                    for r in summary)


def run_seeds(cfg: Mapping[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every seed's recipe (parallel trials where they fit), then the summary files; returns the summary."""
    configs = {s: seed_config(cfg, s) for s in cfg["seeds"]}
    first = next(iter(configs.values()))
    preflight(first)
    ensure_betons(first["data"], list(first["data"]["splits"]), log=log)
    init_ray(first, local_cpus=max(os.cpu_count() or 1, int(cfg["cluster"]["cpus_per_worker"])))
    import ray

    folder = group_dir(cfg)
    limit = trials_that_fit(first, ray.cluster_resources(), use_gpu(first))
    run_recipe_grid({f"seed{s}": c for s, c in configs.items()}, folder, limit, log=log)
    per_seed, runs = {}, {}
    for s, c in configs.items():
        res = json.loads((run_dir(c) / "results.json").read_text())
        per_seed[s] = results_rows(res["evaluations"], list(c["eval"]["protocols"]))
        runs[s] = str(run_dir(c))
    summary = summarise(per_seed)
    write_seed_results(folder, per_seed, summary, runs)
    figure = str(plot_seeds(summary, folder / "seeds.png")) if summary else None  # eval.protocols=[]: none
    return {"dir": str(folder), "summary": summary, "figure": figure, "runs": runs}
