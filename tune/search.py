"""Hyper-parameter search with Ray Tune + ASHA over one pre-training stage.

    python -m tune.search tune=demo                          # digits, CPU, a few minutes
    python -m tune.search tune=deacl_asha cluster=ray data=... tune.num_samples=64
    python -m tune.search tune=demo --cfg                    # print the plan and exit
    python -m tune.search tune=demo resume=true              # continue an interrupted sweep

Each trial is a Tune function trainable that launches the configured method's pre-training stage
(`trainer.recipes.stage_payload` + `trainer.launch.run_train_stage`, a Ray Train run over
`cluster.num_workers` workers) with `TuneReportCallback`: every epoch's `ray.train.report` is one
Tune result. ASHA's rungs are on `tune.time_attr`: `epoch`, or `compute` (the worker's cumulative
images x (1 + training PGD steps), so a 10-step trial spends its rung budget 2.75x faster than a
3-step one). The metric is the validation monitor's (`monitor.robust_every`,
trainer/evaluation/monitor.py): clean/PGD accuracy of a linear probe on the held-out val split
under a fixed attack, combined by `tune.objective`. Points come from `tune.search_alg`
(tune/searchers.py): random sampling, Optuna's TPE, or BOHB with its HyperBand scheduler.

The sweep lives in `<cluster.storage_path>/<tune.name>`; running the same command again restores it
(`Tuner.restore`): finished trials are kept, unfinished ones restart and their Train runs resume
from their own last checkpoint (run name = `<sweep>-<trial id>`). ASHA's rungs are rebuilt from the
restored trials' results (Tune does not save scheduler state); the searcher's state (TPE's or
BOHB's model) is saved by Tune in the sweep folder and restored with it. A DeACL sweep trains its teacher
once, as a recipe stage of its own (`trainer.recipes.run_stage`), before the trials.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from conf import ConfigError, compose, compose_raw, config_hash, validate
from conf.cli import CommandLine, cli_main
from data_pipeline.write import ensure_betons
from trainer import signals
from trainer.grid import per_trial_resources, trials_that_fit
from trainer.launch import init_ray, run_train_stage, trainer_path, use_gpu
from trainer.recipes import initial_artifacts, plan, preflight, run_stage, stage_payload
from trainer.trial_stop import StopTrials, park, stopped_trials, stopping_trials_between_steps
from trainer.worker import pretrain_loop
from tune.analyze import read_jsonl, trial_statuses
from tune.records import KeepTrialRecords
from tune.schedulers import describe_scheduler, make_scheduler, scheduler_max_t
from tune.searchers import check_search_config, make_searcher
from tune.space import apply_params, check_space, param_space

SWEEP_FILE = "sweep.json"
# tune.* keys that change how a sweep runs, not what it computes (kept out of the derived name).
NOT_IN_NAME = ("name", "max_concurrent_trials", "local_cpus", "verbose", "retry_errored", "storage_path")
VAL_METRICS = ("objective", "val_clean_acc", "val_robust_acc")


# --------------------------------------------------------------------------- configuration

def override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def merge_overrides(*lists: list[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces the earlier one."""
    out: dict[str, str] = {}
    for lst in lists:
        for arg in lst:
            out.pop(override_key(arg), None)
            out[override_key(arg)] = arg
    return list(out.values())


def compose_sweep(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Compose `preset overrides (tune.overrides) + command-line overrides` (the latter win).

    Returns (cfg, base_overrides) where base_overrides is the full override list that reproduces cfg.
    """
    block = compose_raw(overrides).tune
    if not block.enabled:
        raise ConfigError("tune.enabled=False: choose a sweep preset, e.g. tune=demo (conf/tune/*.yaml)")
    base = merge_overrides([str(o) for o in block.overrides], list(overrides))
    cfg = compose(base)
    check_sweep_config(cfg)
    return cfg, base


def check_sweep_config(cfg: Mapping[str, Any]) -> None:
    """The rules a sweep adds to a run's (space, budget and metric against the config)."""
    t = cfg["tune"]
    check_space(t["space"], cfg)
    check_search_config(t)
    check_budget(cfg)
    if t["metric"] in VAL_METRICS and cfg["monitor"]["robust_every"] != 1:
        raise ConfigError(f"monitor.robust_every={cfg['monitor']['robust_every']!r} is invalid for a sweep on "
                          f"{t['metric']}: must be 1 (ASHA compares trials at every epoch rung)")
    if cfg["recipe"] == "evaluate":
        raise ConfigError("recipe=evaluate cannot be swept")


def check_budget(cfg: Mapping[str, Any]) -> None:
    """Grace period and max_t in `tune.time_attr` units: epochs (max_t <= the epochs), or compute
    (max_t required: its scale depends on the data and the attack)."""
    t, epochs = cfg["tune"], int(cfg["method"]["train"]["epochs"])
    gp, max_t = t["scheduler"]["grace_period"], t["scheduler"]["max_t"]
    if t["time_attr"] == "epoch":
        if max_t is not None and max_t > epochs:
            raise ConfigError(f"tune.scheduler.max_t={max_t!r} is invalid: must be an integer in "
                              f"[1, method.train.epochs={epochs}] (or null) with tune.time_attr=epoch")
        if gp > (max_t or epochs):
            raise ConfigError(f"tune.scheduler.grace_period={gp!r} is invalid: must be an integer in "
                              f"[1, {'tune.scheduler.max_t' if max_t else 'method.train.epochs'}={max_t or epochs}]")
        return
    if max_t is None and t["scheduler"]["name"] == "asha":
        raise ConfigError("tune.scheduler.max_t=None is invalid with tune.time_attr=compute: give the budget in "
                          "compute units (training images x (1 + PGD steps), e.g. epochs x train images x 4 for "
                          "3-step PGD)")
    if max_t is not None and gp > max_t:
        raise ConfigError(f"tune.scheduler.grace_period={gp!r} is invalid: must be an integer in "
                          f"[1, tune.scheduler.max_t={max_t}]")


def sweep_name(cfg: Mapping[str, Any]) -> str:
    t = cfg["tune"]
    if t["name"]:
        return str(t["name"])
    keep = {k: v for k, v in t.items() if k not in NOT_IN_NAME}
    h = config_hash({**{k: v for k, v in cfg.items() if k != "tune"}, "_tune": keep})
    return f"sweep-{t['preset'] or 'custom'}-{cfg['method']['name']}-{cfg['data']['name']}-{h}"


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else str(Path(root, *parts))


def sweep_dir(cfg: Mapping[str, Any]) -> str:
    root = cfg["tune"]["storage_path"] or cfg["cluster"]["storage_path"]
    if "://" not in str(root):
        root = str(Path(root).expanduser().absolute())
    return _join(str(root), sweep_name(cfg))


def trials_storage(cfg: Mapping[str, Any]) -> str:
    """Where the trials' Ray Train runs (checkpoints) live: inside the sweep folder."""
    return _join(sweep_dir(cfg), "train_runs")


# --------------------------------------------------------------------------- resources

def max_concurrent(cfg: Mapping[str, Any], cluster_resources: Mapping[str, float], gpu: bool,
                   explicit: int | None = None) -> int:
    """How many trials fit the cluster at once (`tune.max_concurrent_trials` wins when set)."""
    return trials_that_fit(cfg, cluster_resources, gpu, explicit or cfg["tune"]["max_concurrent_trials"])


def init_ray_for_sweep(cfg: Mapping[str, Any]) -> None:
    """Connect to the configured cluster, or start a local Ray sized for concurrent trials."""
    need = int(cfg["cluster"]["num_workers"]) * int(cfg["cluster"]["cpus_per_worker"])
    init_ray(cfg, local_cpus=int(cfg["tune"]["local_cpus"] or max(os.cpu_count() or 1, need)))


# --------------------------------------------------------------------------- trials

def ensure_teacher(cfg: Mapping[str, Any], where: str, log: Callable[[str], None] = print) -> str:
    """Train the DeACL teacher once for the whole sweep (a recipe stage); reuse it afterwards."""
    tcfg = copy.deepcopy(dict(cfg))
    tcfg["monitor"]["robust_every"] = 0
    stage = plan(tcfg)[0]
    log(f"[tune] the DeACL teacher ({stage.method['name']}, {stage.method['train']['epochs']} epochs) is "
        f"trained once for the whole sweep -> {where}")
    info = run_stage(tcfg, stage, {}, Path(where), f"{Path(where).parent.name}-teacher", log=log)
    return str(info["model_path"])


def trial_fn(params: dict[str, Any], base: dict[str, Any] | None = None, sweep: str = "",
             reported: dict[str, int] | None = None, experiment: str = "") -> None:
    """One trial: base config + sampled params -> one Ray Train pre-training stage, reported to Tune.

    `reported` (a restored sweep): the last epoch Tune recorded per trial, absent = none. Stopped
    between steps by the sweep driver's signal (trainer/trial_stop.py), it waits to be ended."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    params = {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}  # BOHB's numpy scalars
    cfg = validate({**apply_params(base, params, base["tune"]["space"]), "run_name": f"{sweep}-{trial_id}"})
    stage = next(s for s in plan(cfg) if s.kind == "pretrain" and s.name != "teacher")
    payload = stage_payload(cfg, stage, initial_artifacts(cfg))
    if replay_point(reported, trial_id) is not None:  # restored sweep: replay the epochs Tune did not record
        payload["reported_epochs"] = replay_point(reported, trial_id)
    try:
        run_train_stage(cfg, payload, pretrain_loop, cfg["run_name"], callbacks=[TuneReportCallback()])
    except signals.Interrupted as stopped:
        park(experiment, trial_id, stopped.epoch)


def replay_point(reported: Mapping[str, int] | None, trial_id: str) -> int | None:
    """The last epoch Tune recorded for a trial of a restored sweep (`reported`: reported_epochs); 0 for
    a trial without result.json (Tune recorded none: every epoch of its checkpoint is replayed). None:
    a new sweep, or one whose records are not readable here (nothing replayed)."""
    return None if reported is None else int(reported.get(trial_id, 0))


def trial_markers(base: Mapping[str, Any], sweep: str, trial: Any) -> list[str]:
    """The stop marker of a trial's Train run (trial_fn names it `<sweep>-<trial id>`)."""
    return [signals.stop_file(trainer_path(base, f"{sweep}-{trial.trial_id}"))]


def trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def reported_epochs(path: str) -> dict[str, int] | None:
    """trial id -> the last epoch in its result.json (what Tune recorded before the interruption); a
    trial without one is absent (Tune recorded none of its epochs). None: not readable here (a URI)."""
    out: dict[str, int] = {}
    if "://" in path:
        return None
    for result in Path(path).glob("trial_*/result.json"):
        epochs = [int(r["epoch"]) for r in read_jsonl(result) if "epoch" in r]
        out[result.parent.name[len("trial_"):]] = max(epochs, default=0)
    return out


def unfinished_trials(path: str, search_alg: str = "random") -> int:
    """Trials neither TERMINATED nor ERROR in the sweep's newest state (0 when unreadable). Under BOHB a
    PAUSED trial is one HyperBandForBOHB stopped at a rung and never resumed: it is done, not unfinished."""
    if "://" in path:
        return 0
    done = ("TERMINATED", "ERROR", "PAUSED") if search_alg == "bohb" else ("TERMINATED", "ERROR")
    return sum(1 for s in trial_statuses(path).values() if s not in done)


# --------------------------------------------------------------------------- the sweep

def prepare_base(cfg: Mapping[str, Any], name: str, path: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The config every trial starts from: trials' storage in the sweep folder, DeACL's teacher trained."""
    base = copy.deepcopy(dict(cfg))
    base["cluster"]["storage_path"] = trials_storage(cfg)
    if base["method"]["name"] == "deacl" and not base["teacher"]["checkpoint"]:
        base["teacher"]["checkpoint"] = ensure_teacher(base, _join(path, "teacher"), log=log)
    return validate(base)


def write_sweep_file(path: str, meta: Mapping[str, Any]) -> None:
    if "://" not in path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / SWEEP_FILE).write_text(json.dumps(meta, indent=2, default=str))


def make_tuner(cfg: Mapping[str, Any], trainable: Any, meta: Mapping[str, Any], exists: bool,
               callbacks: list | None):
    """A new Tuner (StopTrials and KeepTrialRecords first among its callbacks), or the restored one (its
    callbacks come back with it)."""
    from ray import tune

    t, path, name = cfg["tune"], meta["sweep_dir"], meta["sweep_name"]
    if exists:  # the searcher's state comes back from the sweep folder, the scheduler from tuner.pkl
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=bool(t["retry_errored"]))
    stop = StopTrials(path, functools.partial(trial_markers, meta["config"], name))
    keep = KeepTrialRecords()  # before Tune's own loggers, which Tune appends after these
    search, limit = make_searcher(t, meta["max_concurrent_trials"])
    return tune.Tuner(
        trainable, param_space=param_space(t["space"]),
        tune_config=tune.TuneConfig(metric=meta["metric"], mode=meta["mode"], scheduler=make_scheduler(cfg),
                                    search_alg=search, max_concurrent_trials=limit, num_samples=int(t["num_samples"]),
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=path[: -len(name)].rstrip("/"),
                                  callbacks=[stop, keep, *(callbacks or [])], verbose=int(t["verbose"])))


def run_sweep(cfg: dict[str, Any], base_overrides: list[str], resume: str = "auto",
              callbacks: list | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or restore) the sweep described by cfg['tune']; returns a summary dict."""
    import ray
    from ray import tune

    t = cfg["tune"]
    name, path = sweep_name(cfg), sweep_dir(cfg)
    exists = tune.Tuner.can_restore(path) and ("://" in path or bool(trial_statuses(path)))
    if resume == "true" and not exists:
        raise ConfigError(f"resume=true but there is no sweep to restore at {path}")
    if resume == "false" and exists:
        raise ConfigError(f"resume=false but a sweep already exists at {path}; delete it, set tune.name=..., "
                          "or resume it (resume=auto)")
    preflight(cfg)
    with signals.phase("writing the .beton files"):
        ensure_betons(cfg["data"], list(cfg["data"]["splits"]), log=log)
    init_ray_for_sweep(cfg)
    base = prepare_base(cfg, name, path, log)
    gpu = use_gpu(base)
    meta = {"sweep_name": name, "sweep_dir": path, "base_overrides": base_overrides,
            "teacher_checkpoint": base["teacher"]["checkpoint"] if base["method"]["name"] == "deacl" else None,
            "metric": t["metric"], "mode": t["mode"], "max_t": int(cfg["method"]["train"]["epochs"]),
            "search_alg": t["search_alg"], "time_attr": t["time_attr"], "scheduler_max_t": scheduler_max_t(cfg),
            "space": t["space"], "tune": t, "max_concurrent_trials": max_concurrent(cfg, ray.cluster_resources(), gpu),
            "per_trial": per_trial_resources(cfg, gpu), "config": base}
    write_sweep_file(path, meta)
    reported = reported_epochs(path) if exists else None
    trainable = tune.with_resources(tune.with_parameters(trial_fn, base=base, sweep=name, reported=reported,
                                                         experiment=path), {"cpu": 0.01})
    log(f"[tune] sweep {name}: {t['num_samples']} sample(s) over {', '.join(t['space'])} ({t['search_alg']}); "
        f"{describe_scheduler(cfg)}; metric {meta['metric']} ({meta['mode']}); {meta['max_concurrent_trials']} "
        f"trial(s) at once, each {meta['per_trial']}; {'restoring' if exists else 'new'} at {path}")
    t0 = time.time()
    with signals.phase(f"sweep {name}"), stopping_trials_between_steps():
        grid = make_tuner(cfg, trainable, meta, exists, callbacks).fit()
        stopped = stopped_trials()
    unfinished = unfinished_trials(path, t["search_alg"])
    if signals.received() is not None:  # Tune saved the experiment state: the line, then 128 + signal
        raise signals.interrupted(f"sweep {name} with {unfinished} unfinished trial(s), {len(stopped)} of them "
                                  "stopped after their last finished epoch")
    if unfinished:
        log(f"[tune] sweep interrupted with {unfinished} unfinished trial(s); run the same command again "
            "(or add resume=true) to continue it")
    return {"sweep_dir": path, "seconds": time.time() - t0, "trials": len(grid), "errors": grid.num_errors,
            "unfinished": unfinished}


# --------------------------------------------------------------------------- CLI

def show_plan(cfg: Mapping[str, Any], base_overrides: list[str]) -> None:
    t = cfg["tune"]
    print(json.dumps({"sweep_dir": sweep_dir(cfg), "base_overrides": base_overrides, "space": t["space"],
                      "metric": t["metric"], "mode": t["mode"], "max_t": cfg["method"]["train"]["epochs"],
                      "search_alg": t["search_alg"], "time_attr": t["time_attr"],
                      "scheduler_max_t": scheduler_max_t(cfg), "scheduler": describe_scheduler(cfg),
                      "num_samples": t["num_samples"], "config": cfg},
                     indent=2, default=str))


def sweep_command(cl: CommandLine) -> int:
    signals.install()  # SIGINT / SIGTERM: Tune saves the sweep's state, then one line (trainer/signals.py)
    resume, analyze = cl.own.get("resume", "auto").lower(), cl.own.get("analyze", "true").lower()
    if resume not in ("auto", "true", "false"):
        raise ConfigError(f"resume={resume!r} is invalid: allowed: auto, true, false")
    if analyze not in ("true", "false"):
        raise ConfigError(f"analyze={analyze!r} is invalid: allowed: true, false")
    cfg, base_overrides = compose_sweep(cl.overrides)
    if cl.show_cfg:
        show_plan(cfg, base_overrides)
        return 0
    summary = run_sweep(cfg, base_overrides, resume=resume)
    if analyze == "true" and "://" not in summary["sweep_dir"]:
        from tune.analyze import analyze as analyze_sweep

        analyze_sweep(summary["sweep_dir"])
    return 1 if summary["unfinished"] else 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(__doc__, argv, sweep_command, own_keys=("resume", "analyze"))


if __name__ == "__main__":
    # Run the copy imported as `tune.search`, so that Ray pickles the trainable and the scheduler by
    # reference to this module (not by value from `__main__`, which a restore would replay stale).
    from tune.search import main as _main

    raise SystemExit(_main())
