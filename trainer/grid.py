"""A grid of whole recipe runs as parallel Ray Tune trials: a run's seeds, the study's schemes.

    run_recipe_grid({"seed0": cfg0, "seed1": cfg1}, folder, max_concurrent)

Each trial runs `trainer.recipes.run_recipe` on its config (its own run folder, named by its
config hash, so finished stages are reused) and reports the evaluation metrics once. The Tune
experiment lives in `<folder>/tune`; running the same grid again restores it: finished trials are
kept, unfinished ones run again (and resume their stages from their checkpoints). SIGINT / SIGTERM
stop each running trial's pre-training stage between steps, as a single run's (trainer/trial_stop.py);
the driver then exits with the one line and 130 / 143.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from trainer import signals
from trainer.launch import trainer_path
from trainer.recipes import plan, run_recipe
from trainer.trial_stop import StopTrials, park, stopped_trials, stopping_trials_between_steps


def per_trial_resources(cfg: Mapping[str, Any], gpu: bool) -> dict[str, float]:
    """What one trial's Ray Train workers claim."""
    c = cfg["cluster"]
    need = {"CPU": int(c["num_workers"]) * int(c["cpus_per_worker"])}
    if gpu:
        need["GPU"] = int(c["num_workers"]) * float(c["gpus_per_worker"])
    return need


def trials_that_fit(cfg: Mapping[str, Any], cluster_resources: Mapping[str, float], gpu: bool,
                    explicit: int | None = None) -> int:
    """How many trials fit the cluster at once (each: its Train workers + a 0.01-CPU trial actor)."""
    if explicit:
        return int(explicit)
    need = per_trial_resources(cfg, gpu)
    fits = [math.floor((cluster_resources.get("CPU", 0) + 1e-9) / (need["CPU"] + 0.01))]
    if gpu:
        fits.append(math.floor((cluster_resources.get("GPU", 0) + 1e-9) / need["GPU"]))
    return max(1, min(fits))


def recipe_trial(params: dict[str, Any], configs: Mapping[str, dict[str, Any]] | None = None,
                 experiment: str = "") -> None:
    """One trial: the recipe of `configs[params["key"]]`, then one Tune report of its metrics. Stopped
    between steps by the driver's signal (trainer/trial_stop.py), it waits to be ended."""
    from ray import tune

    key = params["key"]
    try:
        results = run_recipe(configs[key])
    except signals.Interrupted:
        park(experiment, tune.get_context().get_trial_id(), None)  # no per-epoch reports to wait for
    metrics = next(iter(results["evaluations"].values()), {})
    tune.report({"key": key, "run_dir": results["run_dir"],
                 **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})


def recipe_markers(configs: Mapping[str, dict[str, Any]], trial: Any) -> list[str]:
    """The stop markers of a recipe trial's pre-training stages (run_recipe names them `<run>-<stage>`)."""
    cfg = configs[trial.config["key"]]
    return [signals.stop_file(trainer_path(cfg, f"{cfg['run_name']}-{s.name}")) for s in plan(cfg)
            if s.kind == "pretrain"]


def run_recipe_grid(configs: Mapping[str, dict[str, Any]], folder: Path, max_concurrent: int,
                    log: Callable[[str], None] = print) -> None:
    """Run (or restore) one Tune trial per config; raises if a trial failed (after all ran), and
    signals.Interrupted (the one line, 130 / 143) after a signal stopped the grid."""
    from ray import tune

    path = str(folder / "tune")
    trainable = tune.with_resources(tune.with_parameters(recipe_trial, configs=dict(configs), experiment=path),
                                    {"cpu": 0.01})
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        name = lambda t: f"trial_{t.config['key']}"  # noqa: E731
        tuner = tune.Tuner(
            trainable, param_space={"key": tune.grid_search(list(configs))},
            tune_config=tune.TuneConfig(max_concurrent_trials=int(max_concurrent), reuse_actors=False,
                                        trial_name_creator=name, trial_dirname_creator=name),
            run_config=tune.RunConfig(name="tune", storage_path=str(folder), verbose=1, callbacks=[
                StopTrials(path, functools.partial(recipe_markers, dict(configs)))]))
    log(f"[grid] {len(configs)} runs ({', '.join(configs)}), {max_concurrent} at once; {path}")
    with signals.phase(f"the runs {', '.join(configs)}"), stopping_trials_between_steps():
        grid = tuner.fit()
        stopped = stopped_trials()
    if signals.received() is not None:  # Tune saved the grid's state: the line, then 128 + signal
        unfinished = sum(1 for r in grid if not r.metrics or "key" not in r.metrics)
        raise signals.interrupted(f"with {unfinished} of {len(configs)} run(s) unfinished, {len(stopped)} of "
                                  "them stopped after their last finished epoch")
    if grid.num_errors:
        failed = [r.config.get("key") for r in grid if r.error]
        raise RuntimeError(f"runs {failed} failed; run the same command again to retry them (finished "
                           f"stages are reused). Logs: {path}")
