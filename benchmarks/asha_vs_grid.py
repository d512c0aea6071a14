"""ASHA vs the full grid: trial-epochs spent and the best validation metric found.

Live (default): the same sweep (`tune=demo` unless told otherwise: 8 sampled DeACL configs x up to
4 epochs on digits) is run twice through `tune.search.run_sweep` -- once with ASHA, once with FIFO
(every configuration to the full budget). Both draw the same configurations (same search seed) and
distil from the same teacher (trained once, by the first sweep).

Offline (`--simulate <sweep dir>`): replays ASHA's stopping rule on a finished full-budget sweep,
trial by trial in trial-id order (one trial at a time, as on a 2-core machine): at each rung a
trial stops when its metric is below the (1 - 1/reduction_factor) quantile of the metrics recorded
at that rung so far (Ray's `ASHAScheduler` cut-off). No training; seconds.

Printed and written (`--json`): trial-epochs and best metric of each side, and their ratios. The
best metric is the best among trials that ran the full budget (the leaderboard's rule: a metric
after fewer epochs is not comparable).

    python benchmarks/asha_vs_grid.py                                  # live, tune=demo
    python benchmarks/asha_vs_grid.py tune.num_samples=4 method.train.epochs=2
    python benchmarks/asha_vs_grid.py --simulate outputs/sweeps/<fifo sweep>
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_of(values: list[float], mode: str) -> float | None:
    """The best of the values under the sweep's mode (max or min); None when there are none."""
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def summarize(sweep: dict[str, Any]) -> dict[str, Any]:
    """Trial-epochs spent and the best full-budget metric of a loaded sweep (tune.analyze.load_sweep)."""
    full = [t["metric"] for t in sweep["trials"]
            if t["full_budget"] and isinstance(t["metric"], (int, float)) and math.isfinite(t["metric"])]
    return {"trials": len(sweep["trials"]), "trial_epochs": sum(t["epochs"] for t in sweep["trials"]),
            "full_budget_trials": len(full), "best": best_of(full, sweep["mode"])}


def asha_cutoff(recorded: list[float], reduction_factor: float, mode: str) -> float:
    """Ray's ASHA cut-off at a rung: the (1 - 1/rf) quantile of what the rung has recorded."""
    import numpy as np

    signed = [m if mode == "max" else -m for m in recorded]
    return float(np.nanpercentile(signed, (1 - 1 / reduction_factor) * 100))


def simulate_asha(sweep: dict[str, Any], grace_period: int, reduction_factor: float) -> dict[str, Any]:
    """Replay ASHA (one bracket) on the per-epoch histories of a full-budget sweep."""
    from tune.analyze import asha_rungs

    max_t, mode, metric = sweep["max_t"], sweep["mode"], sweep["metric"]
    scheduler = {"name": "asha", "grace_period": grace_period, "reduction_factor": reduction_factor}
    # The rung at max_t stops nothing: a trial that reaches it has finished anyway.
    rungs = [int(r) for r in asha_rungs({"tune": {"scheduler": scheduler}}, max_t) if r < max_t]
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    spent, finals = 0, []
    for t in sorted(sweep["trials"], key=lambda t: t["trial_id"]):
        by_epoch = {int(h["epoch"]): h.get(metric) for h in t["history"]}
        stopped_at = max_t
        for rung in rungs:
            m = by_epoch.get(rung)
            if m is None:
                break
            recorded[rung].append(m)
            if (m if mode == "max" else -m) < asha_cutoff(recorded[rung], reduction_factor, mode):
                stopped_at = rung
                break
        ran = min(stopped_at, max(by_epoch or [0]))
        spent += ran
        if ran >= max_t and by_epoch.get(max_t) is not None:
            finals.append(by_epoch[max_t])
    return {"trials": len(sweep["trials"]), "trial_epochs": spent, "full_budget_trials": len(finals),
            "best": best_of(finals, mode), "rungs": rungs}


def report(asha: dict[str, Any], grid: dict[str, Any], metric: str) -> dict[str, Any]:
    ratio_epochs = asha["trial_epochs"] / grid["trial_epochs"] if grid["trial_epochs"] else None
    ratio_best = asha["best"] / grid["best"] if asha["best"] is not None and grid["best"] else None
    print(f"{'':6s} {'trials':>6s} {'trial-epochs':>12s} {'full budget':>11s} {'best ' + metric:>16s}")
    for name, s in (("ASHA", asha), ("grid", grid)):
        best = f"{s['best']:.4f}" if s["best"] is not None else "-"
        print(f"{name:6s} {s['trials']:6d} {s['trial_epochs']:12d} {s['full_budget_trials']:11d} {best:>16s}")
    print(f"ratio ASHA/grid: trial-epochs {ratio_epochs:.2f}x" if ratio_epochs is not None else "ratio: -", end="")
    print(f", best {metric} {ratio_best:.3f}x" if ratio_best is not None else "", flush=True)
    return {"asha": asha, "grid": grid, "ratio_trial_epochs": ratio_epochs, "ratio_best": ratio_best}


def run_live(overrides: list[str]) -> dict[str, Any]:
    from tune.analyze import load_sweep
    from tune.search import compose_sweep, run_sweep

    if not any(o.startswith("tune=") for o in overrides):
        overrides = ["tune=demo", *overrides]
    name = compose_sweep(overrides)[0]["tune"].get("name") or "asha_vs_grid"
    cfg, base = compose_sweep([*overrides, "tune.scheduler.name=asha", f"tune.name={name}-asha"])
    asha_dir = run_sweep(cfg, base)["sweep_dir"]
    teacher = json.loads((Path(asha_dir) / "sweep.json").read_text()).get("teacher_checkpoint")
    extra = [f"teacher.checkpoint={teacher}"] if teacher else []
    cfg, base = compose_sweep([*overrides, *extra, "tune.scheduler.name=fifo", f"tune.name={name}-grid"])
    grid_dir = run_sweep(cfg, base)["sweep_dir"]
    asha_sw, grid_sw = load_sweep(asha_dir), load_sweep(grid_dir)
    print(f"ASHA sweep: {asha_dir}\ngrid sweep: {grid_dir}")
    return report(summarize(asha_sw), summarize(grid_sw), asha_sw["metric"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--simulate", default="", help="a finished full-budget (FIFO) sweep folder: replay ASHA offline")
    p.add_argument("--grace-period", type=int, default=1, help="with --simulate: ASHA's grace period (epochs)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="with --simulate: ASHA's reduction factor")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("overrides", nargs="*", help="live mode: Hydra overrides of the sweep, e.g. tune.num_samples=4")
    args = p.parse_args(argv)
    if args.simulate:
        from tune.analyze import load_sweep

        if args.overrides:
            p.error(f"--simulate takes no overrides (got {' '.join(args.overrides)})")
        if args.grace_period < 1 or args.reduction_factor <= 1:
            p.error(f"--grace-period must be >= 1 and --reduction-factor > 1 "
                    f"(got {args.grace_period}, {args.reduction_factor})")
        try:
            sweep = load_sweep(args.simulate)
        except FileNotFoundError as e:
            print(f"error: --simulate {e}", file=sys.stderr)
            return 2
        grid = summarize(sweep)
        if grid["full_budget_trials"] < grid["trials"]:
            print(f"warning: {grid['trials'] - grid['full_budget_trials']} trial(s) of {args.simulate} did not run "
                  f"the full {sweep['max_t']} epochs; the replay can only use what they recorded", flush=True)
        asha = simulate_asha(sweep, args.grace_period, args.reduction_factor)
        print(f"replayed ASHA (grace {args.grace_period}, reduction factor {args.reduction_factor:g}, "
              f"rungs {asha['rungs']}) on {args.simulate}")
        res = report(asha, grid, sweep["metric"])
    else:
        from conf import ConfigError

        try:
            res = run_live(list(args.overrides))
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
