"""Analyse a sweep folder written by `python -m tune.search`.

    python -m tune.analyze <sweep dir> [--out DIR] [--top N] [--x epoch|compute]

Writes into the sweep folder (or --out):
    leaderboard.csv       one row per trial: status, epochs run, ASHA-stopped?, metric, val clean/robust
                          accuracy, the (effective) hyper-parameters, the last checkpoint
    best.json             the best trial and a ready-to-run `python -m trainer.run ...` command
    learning_curves.png   the metric per epoch (or per unit of compute: --x) for every trial, ASHA rungs
                          (when on that axis) and stopping points marked
    pareto.png            val robust vs clean accuracy (last epoch of each trial) with the Pareto front
    param_effects.png     the metric against each searched hyper-parameter
Ranking: trials that ran the full budget (max_t epochs) first, then by their last reported metric
(ASHA compares trials at equal epochs; a metric after fewer epochs is not comparable).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

SWEEP_FILE = "sweep.json"


# --------------------------------------------------------------------------- loading

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a Tune result.json (a line cut by an interruption is skipped)."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by an interruption
    return rows


def trial_statuses(sweep: str | Path) -> dict[str, str]:
    """trial id -> Tune status (TERMINATED, ERROR, RUNNING, PENDING, ...) from the sweep's newest
    experiment state, through Tune's public ExperimentAnalysis; {} before Tune saved any state."""
    import logging

    from ray.tune import ExperimentAnalysis

    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        trials = ExperimentAnalysis(str(sweep)).trials
    except (ValueError, FileNotFoundError, OSError):  # no experiment state yet
        return {}
    return {t.trial_id: t.status for t in trials}


def _effective(params: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """Config values a trial trained with (`relative_to` specs scaled by their key)."""
    eff = dict(params)
    for key, spec in space.items():
        ref = (spec or {}).get("relative_to")
        if ref and key in params:
            base = params.get(ref)
            if base is None:
                continue
            eff[key] = float(params[key]) * float(base)
    return eff


def load_sweep(sweep_dir: str | Path) -> dict[str, Any]:
    """Sweep metadata + one dict per trial with its per-epoch history (last report per epoch kept)."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep} is not a folder")
    meta = json.loads((sweep / SWEEP_FILE).read_text()) if (sweep / SWEEP_FILE).exists() else {}
    metric, mode = meta.get("metric", "objective"), meta.get("mode", "max")
    space = meta.get("space", {})
    statuses = trial_statuses(sweep)
    trials = []
    for d in sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "params.json").exists()):
        params = json.loads((d / "params.json").read_text())
        by_epoch: dict[int, dict[str, Any]] = {}
        for r in read_jsonl(d / "result.json"):
            if "epoch" in r:
                by_epoch[int(r["epoch"])] = r
        history = [by_epoch[e] for e in sorted(by_epoch)]
        tid = history[-1]["trial_id"] if history else d.name.replace("trial_", "")
        last = history[-1] if history else {}
        trials.append({"trial_id": tid, "dir": str(d), "status": statuses.get(tid, "UNKNOWN"),
                       "params": params, "effective": _effective(params, space), "history": history,
                       "epochs": int(last.get("epoch", 0)), "compute": last.get("compute"), "metric": last.get(metric),
                       "val_clean_acc": last.get("val_clean_acc"), "val_robust_acc": last.get("val_robust_acc"),
                       "checkpoint_path": last.get("checkpoint_path")})
    max_t = int(meta.get("max_t") or max([t["epochs"] for t in trials] or [0]))
    for t in trials:
        t["full_budget"] = t["epochs"] >= max_t
        t["stopped_early"] = t["status"] == "TERMINATED" and 0 < t["epochs"] < max_t
    sign = 1.0 if mode == "max" else -1.0

    def key(t: dict[str, Any]) -> tuple:
        m = t["metric"]
        return (not t["full_budget"], -(sign * m) if isinstance(m, (int, float)) and math.isfinite(m) else math.inf,
                t["trial_id"])

    trials.sort(key=key)
    return {"dir": str(sweep), "meta": meta, "metric": metric, "mode": mode, "max_t": max_t,
            "space": space, "trials": trials}


# --------------------------------------------------------------------------- table + command

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "-"
    return str(v)


def leaderboard_rows(sw: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(sw["space"]) or sorted({k for t in sw["trials"] for k in t["params"]})
    rows = []
    for rank, t in enumerate(sw["trials"], 1):
        row = {"rank": rank, "trial_id": t["trial_id"], "status": t["status"], "epochs": t["epochs"],
               "asha_stopped": t["stopped_early"], sw["metric"]: t["metric"],
               "val_clean_acc": t["val_clean_acc"], "val_robust_acc": t["val_robust_acc"], "compute": t["compute"]}
        for k in keys:
            row[k] = t["effective"].get(k)
        row["checkpoint_path"] = t["checkpoint_path"]
        rows.append(row)
    return rows


def format_leaderboard(rows: list[dict[str, Any]], top: int | None = None) -> str:
    if not rows:
        return "(no trials)"
    cols = [c for c in rows[0] if c not in ("checkpoint_path",)]
    shown = rows[:top] if top else rows
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in shown)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(_fmt(r[c]).rjust(widths[c]) for c in cols) for r in shown]
    if top and len(rows) > top:
        lines.append(f"... {len(rows) - top} more in leaderboard.csv")
    return "\n".join(lines)


def _cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # exact: the command trains what the trial trained
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_cli_value(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v)


def best_command(sw: dict[str, Any], trial: dict[str, Any]) -> str:
    """`python -m trainer.run ...` that trains the best configuration with the sweep's base config."""
    meta = sw["meta"]
    def key(a: str) -> str:
        return a.split("=", 1)[0].lstrip("+~")

    args = [a for a in meta.get("base_overrides", []) if not (key(a) == "tune" or key(a).startswith("tune."))]
    extra = {k: f"{k}={_cli_value(v)}" for k, v in trial["effective"].items()}
    if meta.get("teacher_checkpoint"):
        extra["teacher.checkpoint"] = f"teacher.checkpoint={meta['teacher_checkpoint']}"
    merged: dict[str, str] = {}
    for a in args:  # a later override of the same key wins (as in Hydra)
        merged.pop(key(a), None)
        merged[key(a)] = a
    args = [a for k, a in merged.items() if k not in extra] + list(extra.values())
    return "python -m trainer.run " + " ".join(shlex.quote(a) for a in args)


def seed_spread(sw: dict[str, Any]) -> list[dict[str, Any]]:
    """Trials that differ only in `seed` (a searched key), full budget: the metric's mean, sample std, n."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in sw["trials"]:
        if t["full_budget"] and isinstance(t["metric"], (int, float)) and "seed" in t["effective"]:
            rest = {k: v for k, v in t["effective"].items() if k != "seed"}
            groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(t)
    rows = []
    for key, trials in groups.items():
        if len(trials) > 1:
            values = [float(t["metric"]) for t in trials]
            rows.append({**json.loads(key), "seeds": " ".join(str(t["effective"]["seed"]) for t in trials),
                         "n": len(values), f"{sw['metric']}_mean": statistics.fmean(values),
                         f"{sw['metric']}_std": statistics.stdev(values)})
    return rows


# --------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def asha_rungs(meta: dict[str, Any], max_t: float) -> list[float]:
    """ASHA's rungs (one bracket) in the scheduler's time_attr units: grace_period x rf^k <= max_t."""
    tune = meta.get("tune") or {}
    sched = tune.get("scheduler") or {}
    if sched.get("name", "asha") != "asha" or tune.get("search_alg", "random") == "bohb":
        return []  # FIFO stops nothing; BOHB's HyperBand brackets are not ASHA's rungs
    gp, rf = int(sched.get("grace_period", 1)), float(sched.get("reduction_factor", 2))
    n = int(math.log(max_t / gp) / math.log(rf) + 1) if max_t >= gp else 0
    return [gp * rf ** k for k in range(n)]


def curve_axis(sw: dict[str, Any], x: str | None) -> str:
    """The learning curves' x axis: `x`, else the sweep's time_attr; compute needs it in the results."""
    axis = x or sw["meta"].get("time_attr") or "epoch"
    if axis == "compute" and any(h.get("compute") is None for t in sw["trials"] for h in t["history"]):
        raise ValueError("--x compute: this sweep's results have no `compute` (made before the worker "
                         "reported it); use --x epoch")
    return axis


def plot_learning_curves(sw: dict[str, Any], path: Path, x: str | None = None) -> None:
    plt = _plt()
    axis = curve_axis(sw, x)
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20")
    # Rungs are in the scheduler's units: drawn only on that axis.
    on_rung_axis = axis == (sw["meta"].get("time_attr") or "epoch")
    rungs = asha_rungs(sw["meta"], sw["meta"].get("scheduler_max_t") or sw["max_t"]) if on_rung_axis else []
    for rung in rungs:
        ax.axvline(rung, color="0.8", ls="--", lw=1, zorder=0)
    stopped_label = full_label = False
    for i, t in enumerate(sw["trials"]):
        xs = [r[axis] for r in t["history"] if sw["metric"] in r]
        ys = [r[sw["metric"]] for r in t["history"] if sw["metric"] in r]
        if not xs:
            continue
        c = cmap(i % 20)
        ax.plot(xs, ys, "-o", color=c, ms=3, lw=1.5, alpha=0.9, label=t["trial_id"])
        if t["stopped_early"]:
            ax.plot(xs[-1], ys[-1], "x", color="red", ms=10, mew=2.5,
                    label=None if stopped_label else "stopped by ASHA")
            stopped_label = True
        elif t["full_budget"]:
            ax.plot(xs[-1], ys[-1], "*", color=c, mec="k", ms=14,
                    label=None if full_label else "full budget")
            full_label = True
    rungs_note = " (ASHA rungs dashed)" if rungs else ""
    ax.set_xlabel(("epoch" if axis == "epoch" else "compute: images x (1 + PGD steps), cumulative") + rungs_note)
    ax.set_ylabel(f"{sw['metric']} (val)")
    ax.set_title(f"Learning curves: {len(sw['trials'])} trials, max {sw['max_t']} epochs")
    if axis == "epoch":
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (both coordinates maximised), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(sw: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ts = [t for t in sw["trials"] if isinstance(t["val_clean_acc"], (int, float))
          and isinstance(t["val_robust_acc"], (int, float))]
    pts = [(100 * t["val_clean_acc"], 100 * t["val_robust_acc"]) for t in ts]
    if pts:
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[t["epochs"] for t in ts], cmap="viridis",
                        s=[90 if t["full_budget"] else 35 for t in ts], edgecolors="k", zorder=3)
        cb = fig.colorbar(sc, ax=ax, label="epochs trained")
        cb.ax.yaxis.get_major_locator().set_params(integer=True)
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-o", color="red", mfc="none",
                ms=15, mew=1.5, lw=1.5, zorder=2, label=f"Pareto front ({len(front)})")
        for i, t in enumerate(ts):
            ax.annotate(t["trial_id"].split("_")[-1], pts[i], fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        best = sw["trials"][0]
        if best in ts:
            j = ts.index(best)
            ax.scatter([pts[j][0]], [pts[j][1]], marker="*", s=300, c="gold", edgecolors="k", zorder=4,
                       label="best (ranked)")
        ax.legend(fontsize=8)
    ax.set_xlabel("val clean accuracy (%)")
    ax.set_ylabel("val robust accuracy (%)")
    ax.set_title("Robust vs clean (last epoch of each trial)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _as_sort_key(text: str):
    return float(text) if _is_number(text) else 0.0


def plot_param_effects(sw: dict[str, Any], path: Path) -> None:
    plt = _plt()
    keys = list(sw["space"]) or sorted({k for t in sw["trials"] for k in t["params"]})
    n = max(1, len(keys))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        spec = sw["space"].get(key, {})
        xs, ys, full = [], [], []
        for t in sw["trials"]:
            if key in t["params"] and isinstance(t["metric"], (int, float)):
                xs.append(t["params"][key])
                ys.append(t["metric"])
                full.append(t["full_budget"])
        categorical = spec.get("type") in ("choice", "grid") or any(not isinstance(x, (int, float)) for x in xs)
        if categorical:
            values = sorted({json.dumps(x) for x in xs}, key=lambda v: (not _is_number(v), _as_sort_key(v)))
            pos = [values.index(json.dumps(x)) for x in xs]
            labels = [f"{float(v):.4g}" if _is_number(v) else v for v in values]
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
            xs = pos
        for f, marker, lab in ((True, "o", "full budget"), (False, "x", "stopped early")):
            sel = [i for i in range(len(xs)) if full[i] == f]
            if sel:
                ax.scatter([xs[i] for i in sel], [ys[i] for i in sel], marker=marker, s=40,
                           c="C0" if f else "C3", label=lab)
        if spec.get("type") == "loguniform":
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        rel = spec.get("relative_to")
        ax.set_xlabel(f"{key} / {rel}" if rel else key)
        ax.set_ylabel(sw["metric"])
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{sw['metric']} (last epoch) against each searched hyper-parameter")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- entry

def analyze(sweep_dir: str | Path, out: str | Path | None = None, top: int | None = 20,
            log=print, x: str | None = None) -> dict[str, Any]:
    sw = load_sweep(sweep_dir)
    curve_axis(sw, x)  # a bad axis fails before anything is written
    out_dir = Path(out) if out else Path(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(sw)
    if rows:
        with open(out_dir / "leaderboard.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    files = {"leaderboard": str(out_dir / "leaderboard.csv")}
    plot_learning_curves(sw, out_dir / "learning_curves.png", x)
    files["learning_curves"] = str(out_dir / "learning_curves.png")
    for name, fn in (("pareto", plot_pareto), ("param_effects", plot_param_effects)):
        fn(sw, out_dir / f"{name}.png")
        files[name] = str(out_dir / f"{name}.png")
    n_stopped = sum(t["stopped_early"] for t in sw["trials"])
    log(f"[analyze] {sw['dir']}: {len(sw['trials'])} trials, {n_stopped} stopped early by ASHA, "
        f"max {sw['max_t']} epochs; metric {sw['metric']} ({sw['mode']})")
    log(format_leaderboard(rows, top))
    best = None
    if sw["trials"]:
        t = sw["trials"][0]
        best = {"trial_id": t["trial_id"], "metric": t["metric"], "epochs": t["epochs"],
                "val_clean_acc": t["val_clean_acc"], "val_robust_acc": t["val_robust_acc"],
                "config": t["effective"], "checkpoint_path": t["checkpoint_path"],
                "command": best_command(sw, t)}
        (out_dir / "best.json").write_text(json.dumps(best, indent=2, default=str))
        files["best"] = str(out_dir / "best.json")
        log(f"\nbest: trial {t['trial_id']} ({sw['metric']} {_fmt(t['metric'])} after {t['epochs']} epochs)"
            f"; train it with:\n  {best['command']}")
    spread = seed_spread(sw)
    if spread:
        with open(out_dir / "seed_spread.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(spread[0]))
            w.writeheader()
            w.writerows(spread)
        files["seed_spread"] = str(out_dir / "seed_spread.csv")
        log("\nspread over seeds (configurations that ran with several seeds):\n" + format_leaderboard(spread))
    log("written: " + ", ".join(files.values()))
    return {"sweep": sw, "rows": rows, "best": best, "files": files, "seed_spread": spread}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="folder for the table and plots (default: the sweep folder)")
    p.add_argument("--top", type=int, default=20, help="rows printed (all are in the CSV)")
    p.add_argument("--x", choices=("epoch", "compute"), default=None,
                   help="learning curves' x axis (default: the sweep's tune.time_attr)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        analyze(a.sweep_dir, a.out, a.top, x=a.x)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
