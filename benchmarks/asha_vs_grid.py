"""ASHA vs the full grid: trial-epochs and compute spent, and the best validation objective found.

    python benchmarks/asha_vs_grid.py                      # replay the committed fixture (seconds)
    python benchmarks/asha_vs_grid.py --grace-period 1 --reduction-factor 3
    python benchmarks/asha_vs_grid.py --live               # run the full grid sweep, write the fixture
    python benchmarks/asha_vs_grid.py --simulate <sweep dir>   # replay a finished full-budget sweep

The fixture (benchmarks/fixtures/asha_sweep.json) holds the per-epoch histories of one real
full-budget sweep of this system (`tune=asha_bench`: 27 DeACL configurations = 3 eps x 3 PGD step
counts x 3 lam, 9 epochs each, FIFO), with the command, budget, wall time and date it was made.
ASHA's rule (`tune.replay.replay_asha`, Ray's cut-off) is replayed on it offline, once with rungs
in epochs (`time_attr=epoch`) and once in compute (`time_attr=compute`: cumulative images x (1 +
PGD steps), the worker's `compute` report), against the grid that trains every configuration.

Best objective = best among the trials that ran the full budget (the leaderboard's rule: a metric
after fewer epochs is not comparable). The last line reads
`asha/grid trial-epochs ratio R, best-objective gap G points` (G = grid best - ASHA best, x 100).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "asha_sweep.json"
KEPT = ("epoch", "compute", "objective", "val_clean_acc", "val_robust_acc", "epoch_time_s")


# --------------------------------------------------------------------------- the fixture

def fixture_from_sweep(sweep_dir: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A finished sweep folder -> the fixture's dict: per-trial params and per-epoch histories."""
    from tune.analyze import load_sweep

    sw = load_sweep(sweep_dir)
    trials = [{"trial_id": t["trial_id"], "status": t["status"], "params": t["effective"],
               "history": [{k: h[k] for k in KEPT if k in h} for h in t["history"]]}
              for t in sorted(sw["trials"], key=lambda t: t["trial_id"])]
    return {**meta, "metric": sw["metric"], "mode": sw["mode"], "max_t": sw["max_t"], "space": sw["space"],
            "trials": trials}


def live_meta(cfg: dict[str, Any], base: list[str], overrides: list[str], sweep_dir: str, trials: int,
              wall_s: float) -> dict[str, Any]:
    """What the fixture says about the sweep it came from: command, budget, wall time, date."""
    method, model = cfg["method"], cfg["model"]
    return {"command": "python benchmarks/asha_vs_grid.py --live " + " ".join(shlex.quote(o) for o in overrides),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(wall_s, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (nice 19)",
            "sweep_dir": sweep_dir, "base_overrides": base,
            "budget": {"configurations": trials, "epochs": int(method["train"]["epochs"]),
                       "method": method["name"], "data": cfg["data"]["name"], "model": model["arch"],
                       "model_width": model["width"], "batch_size": method["train"]["batch_size"],
                       "teacher_epochs": cfg["teacher"]["method"]["train"]["epochs"],
                       "objective": cfg["tune"]["objective"], "monitor_val_attack": cfg["monitor"]["val_attack"]},
            "compute_unit": "cumulative training images x (1 + training PGD steps), the worker's `compute`"}


def run_live(overrides: list[str], out: Path) -> int:
    """Run the full-budget (FIFO) grid sweep through tune.search and write its histories to `out`."""
    from tune.search import compose_sweep, run_sweep

    if not any(o.startswith("tune=") for o in overrides):
        overrides = ["tune=asha_bench", *overrides]
    cfg, base = compose_sweep([*overrides, "tune.scheduler.name=fifo"])
    t0 = time.time()
    summary = run_sweep(cfg, base)
    wall = time.time() - t0
    if summary["unfinished"] or summary["errors"]:
        print(f"error: the sweep has {summary['unfinished']} unfinished and {summary['errors']} errored "
              "trial(s); run the same command again to finish it (no fixture written)", file=sys.stderr)
        return 1
    fixture = fixture_from_sweep(summary["sweep_dir"], live_meta(cfg, base, overrides, summary["sweep_dir"],
                                                                 summary["trials"], wall))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {out}: {len(fixture['trials'])} trials, sweep wall time {wall / 60:.1f} min")
    return 0


# --------------------------------------------------------------------------- the replay

def load_fixture(path: Path) -> dict[str, Any]:
    """The fixture (or a sweep folder through tune.analyze.load_sweep): metric, mode, epochs, trials."""
    if path.is_dir():
        from tune.analyze import load_sweep

        sw = load_sweep(path)
        return {**sw, "source": f"sweep folder {path}", "trials": sorted(sw["trials"], key=lambda t: t["trial_id"])}
    fx = json.loads(path.read_text())
    return {**fx, "source": f"{path.name} ({fx['budget']['configurations']} configurations x "
                            f"{fx['budget']['epochs']} epochs, {fx['date'][:10]}, sweep wall time "
                            f"{fx['wall_time_s'] / 60:.0f} min: {fx['command']})"}


def grid_summary(sweep: dict[str, Any]) -> dict[str, Any]:
    """What the full grid spends (every trial's whole history) and the best full-budget metric."""
    metric, max_t = sweep["metric"], int(sweep["max_t"])
    finals = [float(t["history"][-1][metric]) for t in sweep["trials"]
              if t["history"] and int(t["history"][-1]["epoch"]) >= max_t and metric in t["history"][-1]]
    best = (max(finals) if sweep["mode"] == "max" else min(finals)) if finals else None
    return {"trials": len(sweep["trials"]), "trial_epochs": sum(len(t["history"]) for t in sweep["trials"]),
            "compute": sum(float(t["history"][-1].get("compute", 0)) for t in sweep["trials"] if t["history"]),
            "full_budget_trials": len(finals), "best": best}


def replay(sweep: dict[str, Any], time_attr: str, grace_period: float, reduction_factor: float) -> dict[str, Any]:
    """ASHA's rule on the sweep's histories, rungs on `time_attr`. For compute, max_t is the largest
    full-budget compute and the grace period is given in epochs of that (most expensive) trial."""
    from tune.replay import AshaRule, replay_asha

    max_epochs = int(sweep["max_t"])
    max_t: float = max_epochs
    if time_attr == "compute":
        max_t = max(float(t["history"][-1]["compute"]) for t in sweep["trials"] if t["history"])
        grace_period = grace_period * max_t / max_epochs
    rule = AshaRule(grace_period, reduction_factor, max_t, sweep["mode"])
    return replay_asha(sweep["trials"], rule, sweep["metric"], time_attr, max_epochs)


def scan(sweep: dict[str, Any], grid: dict[str, Any], attrs: tuple[str, ...], orders: int) -> list[dict[str, Any]]:
    """R and G for grace periods 1-3 x reduction factors 2-4: in trial-id order, and over `orders`
    random arrival orders (ASHA's outcome depends on which trials reach a rung first)."""
    import random
    import statistics

    sign = 1 if sweep["mode"] == "max" else -1
    rows = []
    for time_attr in attrs:
        for gp in (1, 2, 3):
            for rf in (2, 3, 4):
                res = replay(sweep, time_attr, gp, rf)
                shuffled = []
                for seed in range(orders):
                    order = list(sweep["trials"])
                    random.Random(seed).shuffle(order)
                    shuffled.append(replay({**sweep, "trials": order}, time_attr, gp, rf))
                gaps = [100 * sign * (grid["best"] - r["best"]) if r["best"] is not None else math.inf
                        for r in shuffled]
                rows.append({"time_attr": time_attr, "grace_period": gp, "reduction_factor": rf,
                             "R": res["trial_epochs"] / grid["trial_epochs"], "compute_ratio": res["compute"] / grid["compute"],
                             "G": 100 * sign * (grid["best"] - res["best"]) if res["best"] is not None else math.inf,
                             "R_median": statistics.median(r["trial_epochs"] for r in shuffled) / grid["trial_epochs"],
                             "G_median": statistics.median(gaps),
                             "goal_share": sum(g <= 1.0 and r["trial_epochs"] <= 0.4 * grid["trial_epochs"]
                                               for g, r in zip(gaps, shuffled)) / max(orders, 1)})
    return rows


def print_scan(rows: list[dict[str, Any]], orders: int) -> None:
    print(f"\nsettings scan (id order | median over {orders} random trial orders | share of orders meeting "
          "R <= 0.40 and G <= 1.0):")
    print(f"{'time_attr':>9s} {'grace':>5s} {'rf':>3s} {'R':>5s} {'compute':>7s} {'G':>6s} | {'R med':>5s} "
          f"{'G med':>6s} | {'goal':>5s}")
    for r in rows:
        print(f"{r['time_attr']:>9s} {r['grace_period']:5d} {r['reduction_factor']:3d} {r['R']:5.2f} "
              f"{r['compute_ratio']:7.2f} {r['G']:6.2f} | {r['R_median']:5.2f} {r['G_median']:6.2f} | "
              f"{r['goal_share']:5.0%}")


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def report(sweep: dict[str, Any], grid: dict[str, Any], asha: dict[str, dict[str, Any]],
           settings: str) -> dict[str, Any]:
    """The table, the compute ratio of the compute-aware replay and, last, the line the issue asks for."""
    print(f"replayed on {sweep['source']}")
    print(f"ASHA: {settings}; best = best {sweep['metric']} among trials that ran all {sweep['max_t']} epochs")
    print(f"{'':15s} {'trials':>6s} {'trial-epochs':>12s} {'compute':>11s} {'full budget':>11s} {'best':>7s}")
    for name, s in (("grid", grid), *((f"ASHA ({k})", v) for k, v in asha.items())):
        best = f"{s['best']:.4f}" if s["best"] is not None else "-"
        print(f"{name:15s} {s['trials']:6d} {s['trial_epochs']:12d} {s['compute']:11.4g} "
              f"{s['full_budget_trials']:11d} {best:>7s}")
    out = {"grid": grid, "asha": asha}
    for k, s in asha.items():
        gap = 100 * (grid["best"] - s["best"]) * (1 if sweep["mode"] == "max" else -1) \
            if s["best"] is not None and grid["best"] is not None else None
        out[k] = {"trial_epochs_ratio": ratio(s["trial_epochs"], grid["trial_epochs"]),
                  "compute_ratio": ratio(s["compute"], grid["compute"]), "gap_points": gap}
    for k in asha:
        r = out[k]
        compute = f"{r['compute_ratio']:.2f}" if r["compute_ratio"] is not None else "-"
        print(f"time_attr={k}: asha/grid compute ratio {compute}, trial-epochs ratio "
              f"{r['trial_epochs_ratio']:.2f}, best-objective gap "
              + (f"{r['gap_points']:.2f} points" if r["gap_points"] is not None else "- (no full-budget trial)"))
    e = out["epoch"]
    gap = f"{e['gap_points']:.2f}" if e["gap_points"] is not None else "nan"
    print(f"asha/grid trial-epochs ratio {e['trial_epochs_ratio']:.2f}, best-objective gap {gap} points", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--live", action="store_true", help="run the full grid sweep and write the fixture")
    p.add_argument("--fixture", default=str(FIXTURE), help="the fixture to replay (or, with --live, to write)")
    p.add_argument("--simulate", default="", help="replay a finished full-budget sweep folder instead")
    p.add_argument("--grace-period", type=float, default=1, help="ASHA's grace period, in epochs (default 1)")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA's reduction factor (default 3)")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--scan", type=int, default=0, metavar="ORDERS",
                   help="also scan grace periods 1-3 x reduction factors 2-4 over ORDERS random trial orders")
    p.add_argument("overrides", nargs="*", help="--live: Hydra overrides of the sweep")
    args = p.parse_args(argv)
    if args.live:
        from conf import ConfigError

        try:
            return run_live(list(args.overrides), Path(args.fixture))
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
    if args.overrides:
        p.error(f"overrides are for --live only (got {' '.join(args.overrides)})")
    if args.grace_period <= 0 or args.reduction_factor <= 1:
        p.error(f"--grace-period must be > 0 and --reduction-factor > 1 (got {args.grace_period:g}, "
                f"{args.reduction_factor:g})")
    source = Path(args.simulate or args.fixture)
    if not source.exists():
        print(f"error: {source} does not exist (make it with --live)", file=sys.stderr)
        return 2
    sweep = load_fixture(source)
    grid = grid_summary(sweep)
    if grid["full_budget_trials"] < grid["trials"]:
        print(f"warning: {grid['trials'] - grid['full_budget_trials']} trial(s) did not run all {sweep['max_t']} "
              "epochs; the replay can only use what they recorded", flush=True)
    has_compute = all("compute" in h for t in sweep["trials"] for h in t["history"])
    if not has_compute:
        print("note: the histories have no `compute` (a sweep from before the worker reported it): "
              "time_attr=compute is not replayed", flush=True)
    attrs = ("epoch", "compute") if has_compute else ("epoch",)
    asha = {k: replay(sweep, k, args.grace_period, args.reduction_factor) for k in attrs}
    settings = (f"grace period {args.grace_period:g} epoch(s), reduction factor {args.reduction_factor:g}; "
                f"rungs at epochs {[round(r, 3) for r in asha['epoch']['rungs']]}"
                + (f", compute rungs {[round(r) for r in asha['compute']['rungs']]}" if has_compute else ""))
    if args.scan:
        print_scan(scan(sweep, grid, attrs, args.scan), args.scan)
    res = report(sweep, grid, asha, settings)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
