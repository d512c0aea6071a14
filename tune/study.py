"""The empirical study as one recipe: training schemes x robustness scenarios on one Tune grid.

    python -m tune.study                                   # SL / CL / SCL on digits (conf/study/default.yaml)
    python -m tune.study study=study_cifar10 data.root=/datasets/cifar10   # the paper's recipe (ResNet-50)
    python -m tune.study data=cifar10 model=resnet18 study.overrides=[method.train.epochs=200]
    python -m tune.study study.run=[CL,SCL] analysis.n_examples=256 --cfg   # print the plan only

Schemes (after Ghofrani et al.): SL (cross-entropy; adversarially: PGD-AT), CL (SimCLR's instance
positives through the SupCon code path; adversarially: its adversarial pre-training) and SCL
(SupCon; adversarial SupCon). Every scheme is pre-trained standard and adversarially -- the Tune
grid is schemes x {standard, adversarial}, each trial one `recipe=pretrain` run (Ray Train
pre-training, then the evaluation protocols its scenarios need, under Ray Train) -- and the heads
give the study's four scenarios (its Table 1; `study.scenarios`):

    ST          standard encoder,    standard head (SLF)
    AT          adversarial encoder, standard head (SLF)
    partial-AT  adversarial encoder, adversarially trained head (ALF)
    full-AT     adversarial encoder, fine-tuned adversarially (AFF)

The study then writes `study_table.{csv,json,md}` (SA / RA per scheme and scenario, printed too),
`study_scenarios.png`, and per scheme the representation analysis of its adversarial vs its
standard encoder (`cka/<scheme>/`: layer-by-layer CKA heatmaps, clean-vs-adversarial CKA, cross-model
CKA, layer probes) plus `cka_clean_vs_adv.png` (every encoder's same-layer clean-vs-adversarial
CKA in one plot). Running the same command again reuses every finished trial (each trial's run
folder is named by its config hash) and restores an interrupted Tune grid.

Overrides: `study.*` configure the study, `analysis.*` the CKA analysis, everything else applies
to every trial (data=, model=, eval.*, cluster=, attack.*, ...); the method group is the study's.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from conf import ConfigError, compose
from conf.cli import CommandLine, cli_main
from conf.schema import STUDY_SCENARIOS
from trainer.seeds import seed_config

# the default scenarios: scenario -> (pre-training, evaluation protocol)
SCENARIOS: dict[str, tuple[str, str]] = {k: (v["pretraining"], v["protocol"]) for k, v in STUDY_SCENARIOS.items()}
PRETRAININGS = ("standard", "adversarial")
STUDY_FILE = "study.json"


def _value(v: Any) -> str:
    """A Python value as a Hydra override value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(study.* overrides, analysis.* overrides, the rest: every trial's). `study=NAME` picks the option."""
    study, analysis, trial = [], [], []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key == "method" or key.startswith("method@"):
            raise ConfigError(f"{o!r} is invalid here: the study chooses each trial's method "
                              "(study.schemes); use method.<key>=... or study.overrides for budgets")
        if key == "study":
            continue
        (study if key.startswith("study.") else analysis if key.startswith("analysis.") else trial).append(o)
    return study, analysis, trial


def study_option(overrides: list[str]) -> str:
    """The study option named by `study=NAME` (conf/study/NAME.yaml; default: default)."""
    names = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == "study" and "=" in o]
    return names[-1] if names else "default"


def flat_items(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested scheme keys as dotted ones ({attack: {steps: 1}} -> attack.steps)."""
    out: list[tuple[str, Any]] = []
    for k, v in values.items():
        if isinstance(v, Mapping) and v:
            out += flat_items(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def scenario_map(study_cfg: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """scenario -> (pre-training, protocol) from the study config."""
    return {k: (v["pretraining"], v["protocol"]) for k, v in study_cfg["scenarios"].items()}


def protocols_of(scenarios: Mapping[str, tuple[str, str]], kind: str) -> list[str]:
    """The evaluation protocols a pre-training needs (slf first: the CKA analysis reads its head)."""
    needed = list(dict.fromkeys(p for k, p in scenarios.values() if k == kind))
    return (["slf"] if "slf" in needed else []) + [p for p in needed if p != "slf"]


def checked_study(s: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, tuple[str, str]]]:
    """(schemes, run, scenarios) of a study block, or a ConfigError naming what is wrong."""
    schemes, run = s["schemes"], list(s["run"])
    scenarios = scenario_map(s)
    if not scenarios:
        raise ConfigError("study.scenarios={} is invalid: allowed: at least one scenario")
    if not run:
        raise ConfigError(f"study.run={run!r} is invalid: allowed: a non-empty list of {', '.join(schemes)}")
    for name in run:
        if name not in schemes:
            raise ConfigError(f"study.run contains {name!r}: allowed: {', '.join(schemes)}")
    return schemes, run, scenarios


def compose_trials(schemes: Mapping[str, Any], run: list[str], scenarios: Mapping[str, tuple[str, str]],
                   extra: list[str], trial_ov: list[str], shared: list[str],
                   seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Every trial's validated config: scheme x pre-training (x seed), with the protocols its scenarios need."""
    trials: dict[str, dict[str, Any]] = {}
    for scheme in run:
        sch = schemes[scheme]
        for kind in PRETRAININGS:
            protocols = protocols_of(scenarios, kind)
            if not protocols:
                continue
            method_ov = [f"method.{k}={_value(v)}" for k, v in flat_items(sch[kind])]
            ov = [f"method={sch['method']}", *extra, *method_ov, "recipe=pretrain",
                  f"eval.protocols=[{','.join(protocols)}]", "tune=none", *trial_ov, *shared]
            try:
                cfg = compose(ov)
            except ConfigError as e:
                raise ConfigError(f"study trial {scheme}-{kind}: {e}") from e
            for seed in seeds:
                trials[trial_key(scheme, kind, seed, seeds)] = seed_config(cfg, seed) if len(seeds) > 1 else cfg
    return trials


def compose_study(overrides: list[str]) -> dict[str, Any]:
    """Validate everything before Ray starts: the study block and every trial's full config."""
    study_ov, analysis_ov, trial_ov = split_overrides(list(overrides))
    option = f"+study={study_option(list(overrides))}"
    not_method = lambda ov: [o for o in ov if not o.lstrip("+~").startswith("method")]  # noqa: E731
    s = compose([option, *not_method(trial_ov), *study_ov])["study"]  # (method keys: the schemes' methods)
    schemes, run, scenarios = checked_study(s)
    extra = [str(o) for o in s["overrides"]]
    global_extra = not_method(extra)  # data=, model=, preset=
    base = compose([option, *global_extra, *not_method(trial_ov), *study_ov])
    base.pop("study")
    key = json.dumps({"schemes": {n: schemes[n] for n in run}, "trial_overrides": trial_ov, "extra": extra,
                      **({"scenarios": scenarios} if scenarios != SCENARIOS else {})}, sort_keys=True)
    name = s["name"] or f"study-{base['data']['name']}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    study_dir = Path(base["output_dir"]) / name
    shared = [f"output_dir={study_dir / 'runs'}", f"data.beton_dir={base['data']['beton_dir']}",
              f"cluster.storage_path={study_dir / 'ray_results'}"]
    seeds = list(base["seeds"] or [base["seed"]])
    trials = compose_trials(schemes, run, scenarios, extra, trial_ov, shared, seeds)
    analysis_cfg = compose(["+analysis=default", *global_extra, *not_method(trial_ov), *analysis_ov, *shared])
    return {"name": name, "dir": str(study_dir), "run": run, "schemes": {n: schemes[n] for n in run},
            "scenarios": scenarios, "seeds": seeds, "trials": trials, "analysis_cfg": analysis_cfg, "cka": s["cka"],
            "max_concurrent_trials": s["max_concurrent_trials"], "base": base,
            "overrides": list(overrides)}


def trial_key(scheme: str, kind: str, seed: int, seeds: list[int]) -> str:
    return f"{scheme}-{kind}" if len(seeds) == 1 else f"{scheme}-{kind}-seed{seed}"


def run_study(study: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or restore) the grid, then write the comparison table and the CKA figures."""
    import ray

    from data_pipeline.write import ensure_betons
    from trainer.grid import per_trial_resources, run_recipe_grid, trials_that_fit
    from trainer.launch import use_gpu
    from trainer.recipes import preflight, run_dir
    from tune.search import init_ray_for_sweep

    out = Path(study["dir"])
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(study["trials"].values()))
    preflight(first)
    ensure_betons(first["data"], list(first["data"]["splits"]), log=log)
    init_ray_for_sweep(first)
    gpu = use_gpu(first)
    limit = trials_that_fit(first, ray.cluster_resources(), gpu, study["max_concurrent_trials"])
    (out / STUDY_FILE).write_text(json.dumps(
        {"name": study["name"], "run": study["run"], "schemes": study["schemes"], "overrides": study["overrides"],
         "seeds": study["seeds"],
         "trials": {k: {"run_dir": str(run_dir(c)), "method": c["method"]} for k, c in study["trials"].items()}},
        indent=2, default=str))
    log(f"[study] {len(study['trials'])} trials, each {per_trial_resources(first, gpu)}; folder {out}")
    t0 = time.time()
    run_recipe_grid(study["trials"], out, limit, log=log)
    log(f"[study] grid done in {time.time() - t0:.0f}s")
    rows = study_rows(study)
    write_table(out, rows, study)
    figures = [str(plot_scenarios(out, rows))]
    if study["cka"]:
        figures += run_cka(study, out, log)
    summary = {"dir": str(out), "rows": rows, "figures": figures, "seconds": time.time() - t0}
    (out / "study_results.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _evaluation(cfg: Mapping[str, Any]) -> dict[str, float]:
    from trainer.recipes import run_dir

    res = json.loads((run_dir(dict(cfg)) / "results.json").read_text())
    return next(iter(res["evaluations"].values()))


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def study_rows(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (scheme, scenario): SA / RA (PGD) / AA in percent (the mean over the seeds, with
    their sample std and n), read from each trial's results."""
    rows, seeds = [], study["seeds"]
    for scheme in study["run"]:
        for scenario, (kind, protocol) in study.get("scenarios", SCENARIOS).items():
            ms = [_evaluation(study["trials"][trial_key(scheme, kind, s, seeds)]) for s in seeds]
            row = {"scheme": scheme, "scenario": scenario, "pretraining": kind, "protocol": protocol.upper(),
                   "n": len(ms)}
            for name, key in (("SA", "sa"), ("RA_PGD", "ra"), ("AA", "aa")):
                values = [100 * m[f"{protocol}_{key}"] for m in ms if f"{protocol}_{key}" in m]
                row[name], row[f"{name}_std"] = _spread(values) if values else (None, None)
            rows.append(row)
    return rows


def format_study_table(rows: list[dict[str, Any]], pgd_steps: int,
                       scenarios: Mapping[str, tuple[str, str]] | None = None) -> str:
    scenarios = SCENARIOS if scenarios is None else scenarios
    scen = list(scenarios)
    head = f"{'scheme':<8}" + "".join(f"{s:^17}|" for s in scen)
    sub = f"{'':<8}" + "".join(f"{'SA':>8}{'RA':>8} |" for _ in scen)
    lines = [head, sub, "-" * len(sub)]
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        cells = {r["scenario"]: r for r in rows if r["scheme"] == scheme}
        lines.append(f"{scheme:<8}" + "".join(f"{cells[s]['SA']:8.2f}{cells[s]['RA_PGD']:8.2f} |" for s in scen))
        if rows[0]["n"] > 1:
            lines.append(f"{'  ± std':<8}" + "".join(f"{cells[s]['SA_std']:8.2f}{cells[s]['RA_PGD_std']:8.2f} |"
                                                   for s in scen))
    seeds = f" Mean and sample std over {rows[0]['n']} seeds." if rows and rows[0]["n"] > 1 else ""
    what = "; ".join(f"{k}: {kind} encoder + {p.upper()}" for k, (kind, p) in scenarios.items())
    lines.append(f"SA: clean accuracy, RA: PGD-{pgd_steps} robust accuracy, in %.{seeds} {what}.")
    return "\n".join(lines)


def write_table(out: Path, rows: list[dict[str, Any]], study: Mapping[str, Any]) -> None:
    steps = int(next(iter(study["trials"].values()))["eval"]["pgd"]["steps"])
    table = format_study_table(rows, steps, study.get("scenarios"))
    print(table, flush=True)
    (out / "study_table.md").write_text("```\n" + table + "\n```\n")
    (out / "study_table.json").write_text(json.dumps(rows, indent=2))
    with open(out / "study_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["scheme", "scenario", "pretraining", "protocol", "SA", "RA_PGD", "AA",
                                          "SA_std", "RA_PGD_std", "AA_std", "n"])
        w.writeheader()
        w.writerows(rows)


def plot_scenarios(out: Path, rows: list[dict[str, Any]]) -> Path:
    """Grouped bars: per scheme, SA (light) and RA (dark) of the four scenarios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, ax = plt.subplots(figsize=(2.6 * len(schemes) + 2, 4.2))
    width = 0.8 / len(scen)
    colours = plt.get_cmap("tab10")
    x = np.arange(len(schemes))
    for i, s in enumerate(scen):
        sa = [next(r["SA"] for r in rows if r["scheme"] == sc and r["scenario"] == s) for sc in schemes]
        ra = [next(r["RA_PGD"] for r in rows if r["scheme"] == sc and r["scenario"] == s) for sc in schemes]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, sa, width * 0.95, color=colours(i), alpha=0.35)
        ra_std = [next(r["RA_PGD_std"] for r in rows if r["scheme"] == sc and r["scenario"] == s) for sc in schemes]
        ax.bar(pos, ra, width * 0.95, color=colours(i), label=s, yerr=ra_std if rows[0]["n"] > 1 else None,
               capsize=3)
    ax.set_xticks(x, schemes)
    ax.set_ylabel("accuracy (%)  [light: clean SA, dark: PGD RA]")
    ax.set_ylim(0, 100)
    ax.set_title("Training schemes x robustness scenarios")
    ax.legend(ncol=len(scen), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    path = out / "study_scenarios.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_cka(study: Mapping[str, Any], out: Path, log: Callable[[str], None] = print) -> list[str]:
    """Per scheme: analysis of the adversarial encoder (A) against the standard one (B), each
    attacked through its own SLF head; then every encoder's clean-vs-adversarial CKA in one plot."""
    from trainer.analyze_representations import run_analysis
    from trainer.recipes import run_dir

    figures, same_layer = [], {}
    for scheme in study["run"]:
        paths = {}
        for kind in PRETRAININGS:
            d = run_dir(dict(study["trials"][trial_key(scheme, kind, study["seeds"][0], study["seeds"])]))
            paths[kind] = (str(d / "train" / "model.pt"), str(d / "evaluate" / "classifier_slf.pt"))
        res = run_analysis(study["analysis_cfg"], paths["adversarial"][0], paths["standard"][0],
                           paths["adversarial"][1], paths["standard"][1], out=str(out / "cka" / scheme), log=log,
                           labels=(f"{scheme}-adversarial", f"{scheme}-standard"))
        figures += res["figures"]
        for tag, kind in (("a", "adversarial"), ("b", "standard")):
            m = res["models"][tag]
            same_layer[f"{scheme}-{kind}"] = (m["layers"], m["cka_same_layer_clean_vs_adv"])
    figures.append(str(plot_same_layer(out, same_layer)))
    return figures


def plot_same_layer(out: Path, curves: Mapping[str, tuple[list[str], list[float]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (name, (layers, values)) in enumerate(curves.items()):
        ax.plot(range(len(values)), values, marker="o", color=plt.get_cmap("tab10")(i // 2),
                linestyle="-" if name.endswith("adversarial") else "--", label=name)
    layers = next(iter(curves.values()))[0]
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("linear CKA(clean, adversarial)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Same-layer CKA between clean and PGD inputs (solid: adversarial pre-training)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = out / "cka_clean_vs_adv.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def study_command(cl: CommandLine) -> int:
    study = compose_study(cl.overrides)
    if cl.show_cfg:  # the plan, then every trial's whole composed config (its recipe)
        plan = {"dir": study["dir"], "trials": {k: {"method": c["method"]["name"],
                                                    **{m: c["method"].get(m) for m in ("loss", "use_labels", "adversarial")},
                                                    "protocols": c["eval"]["protocols"],
                                                    "run_name": c["run_name"]} for k, c in study["trials"].items()},
                "scenarios": {k: {"pretraining": v[0], "protocol": v[1]} for k, v in study["scenarios"].items()},
                "trial_configs": study["trials"]}
        print(json.dumps(plan, indent=2, default=str))
        return 0
    summary = run_study(copy.deepcopy(study))
    print(f"[study] table: {summary['dir']}/study_table.csv; figures:\n  " + "\n  ".join(summary["figures"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(__doc__, argv, study_command)


if __name__ == "__main__":
    raise SystemExit(main())
