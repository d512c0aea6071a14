"""Random search vs TPE, both with ASHA, at the same budget on the same space (a tabular replay).

    python benchmarks/search_compare.py                     # the committed fixture, 3 seeds, PNG
    python benchmarks/search_compare.py --budget 150 --seeds 0 1 2 3 4 --png curve.png

The space is the fixture's (benchmarks/fixtures/asha_sweep.json, a real full-budget sweep of 27
configurations x 9 epochs; `benchmarks/asha_vs_grid.py --live` made it), its grid keys offered to
the searchers as categorical choices. Each searcher proposes a configuration; the fixture answers
with that configuration's recorded per-epoch history, which goes to the searcher epoch by epoch
(`on_trial_result`) while ASHA's rule (`tune.replay`, grace period 1, reduction factor 3) decides
where the trial stops; the searcher is then told the trial's last result (`on_trial_complete`),
as Ray Tune does live. One trial at a time. Both searchers are Ray's OptunaSearch: TPE from
`tune.searchers.make_searcher` (what `tune.search_alg=optuna` runs), random = Optuna's
RandomSampler (uniform over the choices, like `tune.search_alg=random`). A configuration proposed
twice is trained (replayed) twice: that is what the searcher's choice costs.

Measured: the best objective among trials that ran all 9 epochs, after N trial-epochs, per seed;
the curve (mean over the seeds, min-max band) goes to a PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.asha_vs_grid import FIXTURE, grid_summary, load_fixture  # noqa: E402

PNG = Path(__file__).resolve().parent / "fixtures" / "search_compare.png"


def choice_space(space: dict[str, Any]) -> dict[str, Any]:
    """The fixture's space as a model-based searcher takes it: grid keys become choices."""
    return {k: {**spec, "type": "choice"} if spec["type"] == "grid" else spec for k, spec in space.items()}


def lookup_key(params: dict[str, Any], space: dict[str, Any]) -> tuple:
    """A configuration by its absolute (not `relative_to`) searched values, floats rounded."""
    keys = sorted(k for k, spec in space.items() if not spec.get("relative_to"))
    return tuple(round(float(params[k]), 9) for k in keys)


def make_searcher(kind: str, seed: int, space: dict[str, Any], metric: str, mode: str):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from tune.searchers import make_searcher as tune_searcher
    from tune.space import param_space

    if kind == "tpe":
        searcher = tune_searcher({"search_alg": "optuna", "seed": seed}, 1)[0]
    else:
        searcher = OptunaSearch(sampler=optuna.samplers.RandomSampler(seed=seed))
    searcher.set_search_properties(metric, mode, param_space(space))
    return searcher


def run_search(sweep: dict[str, Any], kind: str, seed: int, budget: int, grace_period: float,
               reduction_factor: float) -> list[tuple[int, float | None]]:
    """(trial-epochs spent, best full-budget metric so far) after every trial, until the budget."""
    from tune.replay import AshaRule, replay_trial

    metric, mode, max_t = sweep["metric"], sweep["mode"], int(sweep["max_t"])
    space = choice_space(sweep["space"])
    table = {lookup_key(t["params"], space): t for t in sweep["trials"]}
    searcher = make_searcher(kind, seed, space, metric, mode)
    rule = AshaRule(grace_period, reduction_factor, max_t, mode)
    spent, best, points, i = 0, None, [(0, None)], 0
    while spent < budget:
        tid = f"{kind}{seed}_{i:04d}"
        trial = table[lookup_key(searcher.suggest(tid), space)]
        ran = replay_trial(rule, tid, trial["history"], metric, "epoch")
        for h in ran:
            searcher.on_trial_result(tid, {**h, "training_iteration": h["epoch"]})
        searcher.on_trial_complete(tid, dict(ran[-1]))
        spent += len(ran)
        if int(ran[-1]["epoch"]) >= max_t:
            value = float(ran[-1][metric])
            best = value if best is None or (value > best if mode == "max" else value < best) else best
        points.append((spent, best))
        i += 1
    return points


def best_at(points: list[tuple[int, float | None]], n: int) -> float | None:
    """The best found by trials that had finished within n trial-epochs."""
    known = [b for spent, b in points if spent <= n]
    return known[-1] if known else None


def plot(curves: dict[str, dict[int, list[tuple[int, float | None]]]], budget: int, grid_best: float,
         path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = list(range(budget + 1))
    for (kind, runs), colour in zip(curves.items(), ("C0", "C3")):
        per_seed = [[best_at(points, x) for x in xs] for points in runs.values()]
        ok = [x for x in xs if all(s[x] is not None for s in per_seed)]
        cols = [[100 * s[x] for s in per_seed] for x in ok]
        ax.plot(ok, [sum(c) / len(c) for c in cols], color=colour, lw=2,
                label=f"{'TPE' if kind == 'tpe' else 'random'} + ASHA (mean of {len(per_seed)} seeds)")
        ax.fill_between(ok, [min(c) for c in cols], [max(c) for c in cols], color=colour, alpha=0.18,
                        label="min-max over seeds")
    ax.axhline(100 * grid_best, color="k", ls="--", lw=1, label="best of the full grid (27 x 9 epochs)")
    ax.text(0.01, 0.01, "TPE's first 10 proposals are random (Optuna's n_startup_trials): with the same seed,\n"
            "the same as random search's, so the curves start together", transform=ax.transAxes, fontsize=7,
            va="bottom", color="0.3")
    ax.set_xlabel("trial-epochs spent")
    ax.set_ylabel("best val objective so far (%), full-budget trials")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixture", default=str(FIXTURE))
    p.add_argument("--budget", type=int, default=243, help="trial-epochs per search (default: what the full grid spends)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--grace-period", type=float, default=1)
    p.add_argument("--reduction-factor", type=float, default=3)
    p.add_argument("--png", default=str(PNG))
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.budget < 1:
        p.error(f"--budget must be >= 1 (got {args.budget})")
    if not Path(args.fixture).exists():
        print(f"error: {args.fixture} does not exist (make it with benchmarks/asha_vs_grid.py --live)", file=sys.stderr)
        return 2
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)
    sweep = load_fixture(Path(args.fixture))
    grid = grid_summary(sweep)
    curves = {kind: {s: run_search(sweep, kind, s, args.budget, args.grace_period, args.reduction_factor)
                     for s in args.seeds} for kind in ("random", "tpe")}
    marks = sorted({args.budget // 4, args.budget // 2, 3 * args.budget // 4, args.budget})
    print(f"random vs TPE, both + ASHA (grace {args.grace_period:g}, rf {args.reduction_factor:g}), on {sweep['source']}")
    print(f"best full-budget {sweep['metric']} (%) after N trial-epochs, seeds {args.seeds}; full grid best "
          f"{100 * grid['best']:.2f} after {grid['trial_epochs']}")
    print(f"{'N':>5s} " + " ".join(f"{k:>24s}" for k in curves))
    table = {}
    for n in marks:
        row = {k: [best_at(pts, n) for pts in runs.values()] for k, runs in curves.items()}
        table[n] = row
        cells = []
        for k in curves:
            vals = [100 * v for v in row[k] if v is not None]
            mean = f"{sum(vals) / len(vals):.2f}" if len(vals) == len(row[k]) else "-"
            cells.append(f"{mean:>7s} ({' '.join(f'{v:.1f}' for v in vals) or '-'})")
        print(f"{n:5d} " + " ".join(f"{c:>24s}" for c in cells))
    title = (f"Random vs TPE (+ ASHA grace {args.grace_period:g}, rf {args.reduction_factor:g}) on the fixture's "
             f"{grid['trials']} DeACL configurations (digits)")
    plot(curves, args.budget, grid["best"], Path(args.png), title)
    print(f"curve: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps({"curves": curves, "table": table, "grid_best": grid["best"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
