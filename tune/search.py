"""Hyper-parameter search with Ray Tune + ASHA over one pre-training stage.

    python -m tune.search tune=demo                          # digits, CPU, a few minutes
    python -m tune.search tune=deacl_asha cluster=ray data=... tune.num_samples=64
    python -m tune.search tune=demo --cfg                    # print the plan and exit
    python -m tune.search tune=demo resume=true              # continue an interrupted sweep

Each trial is a Tune function trainable that launches the configured method's pre-training stage
(`trainer.recipes.run_train_stage`, a Ray Train run over `cluster.num_workers` workers) with
`TuneReportCallback`: every epoch's `ray.train.report` is one Tune result, so ASHA's rungs are
epochs (`time_attr="epoch"`). The metric is the validation monitor's (`monitor.robust_every`,
trainer/evaluation/monitor.py): clean/PGD accuracy of a linear probe on the held-out val split under
a fixed attack, combined by `tune.objective`.

The sweep lives in `<cluster.storage_path>/<tune.name>`; running the same command again restores it
(`Tuner.restore`): finished trials are kept, unfinished ones restart and their Train runs resume
from their own last checkpoint (run name = `<sweep>-<trial id>`). ASHA's rungs are rebuilt from the
restored trials' results (Tune does not save scheduler state).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ray.tune.schedulers import ASHAScheduler

from trainer.config import ConfigError, config_hash, validate
from tune.analyze import read_jsonl
from tune.ray_env import local_runtime_env

SPACE_TYPES = ("choice", "grid", "uniform", "loguniform", "quniform", "randint")
SWEEP_FILE = "sweep.json"
# tune.* keys that change how a sweep runs, not what it computes (kept out of the derived name).
_NOT_IN_NAME = ("name", "max_concurrent_trials", "local_cpus", "verbose", "retry_errored", "storage_path")


# --------------------------------------------------------------------------- configuration

def _raw_tune_block(overrides: list[str]) -> dict[str, Any]:
    """The `tune` group of the composed config, before validation (to read the preset's overrides)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import CONF_DIR

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg.tune, resolve=False)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from e


def compose_sweep(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Compose `preset overrides (tune.overrides) + command-line overrides` (the latter win).

    Returns (cfg, base_overrides) where base_overrides is the full override list that reproduces cfg.
    """
    from trainer.config import compose

    block = _raw_tune_block(overrides)
    if not block.get("enabled"):
        raise ConfigError("tune.enabled=False: choose a sweep preset, e.g. tune=demo (conf/tune/*.yaml)")
    preset = [str(o) for o in (block.get("overrides") or [])]
    base = merge_overrides(preset, list(overrides))
    cfg = compose(base)
    check_sweep_config(cfg)
    return cfg, base


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


def _number(value: Any, key: str) -> float:
    """Numbers, or fractions written as strings ("8/255")."""
    if isinstance(value, bool):
        raise ConfigError(f"tune.space.{key}: {value!r} is not a number")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/", 1)
        try:
            return float(num) / float(den)
        except ValueError:
            pass
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"tune.space.{key}: {value!r} is not a number (fractions like 8/255 are allowed)") from None


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _space_values(key: str, spec: Mapping[str, Any]) -> list[Any]:
    """The values a spec can take at its extremes (for an up-front validity check)."""
    kind = spec["type"]
    if kind in ("choice", "grid"):
        return [v if not isinstance(v, str) or "/" not in v else _number(v, key) for v in spec["values"]]
    return [_number(spec["low"], key), _number(spec["high"], key)]


def check_space(space: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Every key exists in the config, every spec is well formed, and its extremes validate."""
    if not space:
        raise ConfigError("tune.space is empty: nothing to search")
    for key, spec in space.items():
        try:
            _get(cfg, key)
        except KeyError:
            raise ConfigError(f"tune.space.{key}: no such config key (python -m trainer.run --cfg lists them)") from None
        if not isinstance(spec, Mapping) or spec.get("type") not in SPACE_TYPES:
            raise ConfigError(f"tune.space.{key}.type={getattr(spec, 'get', lambda _: spec)('type')!r} is "
                              f"invalid: allowed: {', '.join(SPACE_TYPES)}")
        kind = spec["type"]
        if kind in ("choice", "grid"):
            if not isinstance(spec.get("values"), list) or not spec["values"]:
                raise ConfigError(f"tune.space.{key}.values must be a non-empty list for type={kind}")
        else:
            for b in ("low", "high"):
                if b not in spec:
                    raise ConfigError(f"tune.space.{key}.{b} is missing (type={kind} needs low and high)")
            lo, hi = _number(spec["low"], key), _number(spec["high"], key)
            if not lo < hi:
                raise ConfigError(f"tune.space.{key}: low={lo} must be < high={hi}")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"tune.space.{key}.low={lo} must be > 0 for type=loguniform")
        rel = spec.get("relative_to")
        if rel is not None:
            try:
                _get(cfg, rel)
            except KeyError:
                raise ConfigError(f"tune.space.{key}.relative_to={rel!r}: no such config key") from None
    # Every corner of the space (each key at its extremes) must give a valid config; keys set
    # relative to another key are checked against that key's extremes too.
    keys = list(space)
    extremes = [_space_values(k, space[k]) for k in keys]
    if math.prod(len(e) for e in extremes) <= 512:
        corners = itertools.product(*extremes)
    else:  # too many: one key at a time, the others at their first extreme
        corners = (tuple(v if j == i else extremes[j][0] for j in range(len(keys)))
                   for i in range(len(keys)) for v in extremes[i])
    for corner in corners:
        params = dict(zip(keys, corner))
        try:
            validate(apply_params(cfg, params, space))
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(f"tune.space: the point {{{shown}}} gives an invalid config: {e}") from None


def check_sweep_config(cfg: Mapping[str, Any]) -> None:
    t = cfg["tune"]
    check_space(t.get("space") or {}, cfg)
    if t.get("mode", "max") not in ("max", "min"):
        raise ConfigError(f"tune.mode={t.get('mode')!r} is invalid: allowed: max, min")
    n = t.get("num_samples", 1)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"tune.num_samples={n!r} is invalid: must be an integer >= 1")
    sched = t.get("scheduler") or {}
    if sched.get("name", "asha") not in ("asha", "fifo"):
        raise ConfigError(f"tune.scheduler.name={sched.get('name')!r} is invalid: allowed: asha, fifo")
    epochs = int(cfg["method"]["train"]["epochs"])
    gp = sched.get("grace_period", 1)
    if not isinstance(gp, int) or not 1 <= gp <= epochs:
        raise ConfigError(f"tune.scheduler.grace_period={gp!r} is invalid: must be an integer in "
                          f"[1, method.train.epochs={epochs}]")
    rf = sched.get("reduction_factor", 2)
    if not isinstance(rf, (int, float)) or rf <= 1:
        raise ConfigError(f"tune.scheduler.reduction_factor={rf!r} is invalid: must be > 1")
    metric = t.get("metric", "objective")
    if metric in ("objective", "val_clean_acc", "val_robust_acc") and int(cfg["monitor"]["robust_every"]) != 1:
        raise ConfigError(f"monitor.robust_every={cfg['monitor']['robust_every']!r} is invalid for a sweep on "
                          f"{metric}: must be 1 (ASHA compares trials at every epoch rung)")
    if cfg["method"]["name"] == "deacl" and cfg["recipe"] == "evaluate":
        raise ConfigError("recipe=evaluate cannot be swept")


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of base with the sampled keys set (values of `relative_to` specs scale their key)."""
    cfg = copy.deepcopy(dict(base))
    rel = []
    for key, value in params.items():
        spec = space.get(key) or {}
        if spec.get("relative_to"):
            rel.append((key, value, spec["relative_to"]))
        else:
            _set(cfg, key, value)
    for key, value, ref in rel:
        _set(cfg, key, float(value) * float(_get(cfg, ref)))
    return cfg


def param_space(space: Mapping[str, Any]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind in ("choice", "grid"):
            values = [_number(v, key) if isinstance(v, str) and "/" in v else v for v in spec["values"]]
            out[key] = tune.grid_search(values) if kind == "grid" else tune.choice(values)
            continue
        lo, hi = _number(spec["low"], key), _number(spec["high"], key)
        if kind == "uniform":
            out[key] = tune.uniform(lo, hi)
        elif kind == "loguniform":
            out[key] = tune.loguniform(lo, hi)
        elif kind == "quniform":
            out[key] = tune.quniform(lo, hi, _number(spec.get("q", 1), key))
        else:  # randint, both ends included
            out[key] = tune.randint(int(lo), int(hi) + 1)
    return out


def sweep_name(cfg: Mapping[str, Any]) -> str:
    t = cfg["tune"]
    if t.get("name"):
        return str(t["name"])
    keep = {k: v for k, v in t.items() if k not in _NOT_IN_NAME}
    h = config_hash({**{k: v for k, v in cfg.items() if k != "tune"}, "_tune": keep})
    return f"sweep-{t.get('preset', 'custom')}-{cfg['method']['name']}-{cfg['data']['name']}-{h}"


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else str(Path(root, *parts))


def sweep_dir(cfg: Mapping[str, Any]) -> str:
    root = cfg["tune"].get("storage_path") or cfg["cluster"]["storage_path"]
    if "://" not in str(root):
        root = str(Path(root).expanduser().absolute())
    return _join(str(root), sweep_name(cfg))


def trials_storage(cfg: Mapping[str, Any]) -> str:
    """Where the trials' Ray Train runs (checkpoints) live: inside the sweep folder."""
    return _join(sweep_dir(cfg), "train_runs")


# --------------------------------------------------------------------------- resources

def per_trial_resources(cfg: Mapping[str, Any], gpu: bool) -> dict[str, float]:
    c = cfg["cluster"]
    need = {"CPU": int(c["num_workers"]) * int(c["cpus_per_worker"])}
    if gpu:
        need["GPU"] = int(c["num_workers"]) * float(c.get("gpus_per_worker", 1))
    return need


def max_concurrent(cfg: Mapping[str, Any], cluster_resources: Mapping[str, float], gpu: bool) -> int:
    """How many trials fit the cluster at once (each: its Train workers + a 0.01-CPU trial actor)."""
    explicit = cfg["tune"].get("max_concurrent_trials")
    if explicit:
        return int(explicit)
    need = per_trial_resources(cfg, gpu)
    fits = [math.floor((cluster_resources.get("CPU", 0) + 1e-9) / (need["CPU"] + 0.01))]
    if gpu:
        fits.append(math.floor((cluster_resources.get("GPU", 0) + 1e-9) / need["GPU"]))
    return max(1, min(fits))


def init_ray_for_sweep(cfg: Mapping[str, Any]) -> None:
    """Connect to the configured cluster, or start a local Ray sized for concurrent trials."""
    import ray

    from trainer.recipes import init_ray

    if ray.is_initialized():
        return
    if cfg["cluster"].get("address") or os.environ.get("RAY_ADDRESS"):
        init_ray(dict(cfg))
        return
    need = int(cfg["cluster"]["num_workers"]) * int(cfg["cluster"]["cpus_per_worker"])
    cpus = cfg["tune"].get("local_cpus") or max(os.cpu_count() or 1, need)
    ray.init(num_cpus=int(cpus) + 1, log_to_driver=True, runtime_env=local_runtime_env())


# --------------------------------------------------------------------------- teacher (DeACL)

def ensure_teacher(cfg: dict[str, Any], where: str, log: Callable[[str], None] = print) -> str:
    """Train the DeACL teacher once (recipe machinery, outside the trials); reuse it afterwards."""
    from trainer.recipes import _copy_final_model, plan, run_train_stage
    from trainer.train_loop import pretrain_loop

    out = Path(where)
    done = out / "stage.json"
    if done.exists():
        path = json.loads(done.read_text())["model_path"]
        log(f"[tune] teacher: reusing {path}")
        return path
    tcfg = copy.deepcopy(cfg)
    tcfg["monitor"]["robust_every"] = 0
    stage = plan(tcfg)[0]
    if stage.name != "teacher":
        raise ConfigError("teacher.checkpoint is set: no teacher to train")
    t0 = time.time()
    log(f"[tune] training the DeACL teacher ({stage.method['name']}, {stage.method['train']['epochs']} epochs) "
        f"once for the whole sweep -> {out}")
    stage_dict = {"name": "teacher", "method": stage.method, "method_kwargs": {}}
    result = run_train_stage(tcfg, stage_dict, pretrain_loop, f"{Path(where).parent.name}-teacher")
    model_path = _copy_final_model(result, out)
    done.write_text(json.dumps({"model_path": str(model_path), "seconds": time.time() - t0,
                                "ray_path": result.path}, indent=2))
    return str(model_path)


# --------------------------------------------------------------------------- trials

def _trial_fn(params: dict[str, Any], base: dict[str, Any] | None = None,
              reported: dict[str, int] | None = None) -> None:
    """One trial: base config + sampled params -> one Ray Train pre-training stage, reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainer.recipes import plan, run_train_stage
    from trainer.train_loop import pretrain_loop

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_params(base, params, base["tune"]["space"])
    cfg["run_name"] = f"{base['tune']['_sweep_name']}-{trial_id}"
    validate(cfg)
    stage = next(s for s in plan(cfg) if s.kind == "pretrain" and s.name != "teacher")
    kwargs = {"teacher_path": cfg["teacher"]["checkpoint"]} if stage.method["name"] == "deacl" else {}
    stage_dict = {"name": stage.name, "method": stage.method, "method_kwargs": kwargs}
    if reported and trial_id in reported:  # restored sweep: replay epochs Tune did not record
        stage_dict["reported_epochs"] = reported[trial_id]
    run_train_stage(cfg, stage_dict, pretrain_loop, cfg["run_name"], callbacks=[TuneReportCallback()])


def _trial_history(trial) -> list[dict[str, Any]]:
    roots = []
    for attr in ("local_path", "path"):
        try:
            roots.append(getattr(trial, attr))
        except Exception:  # a new trial has no folder yet
            pass
    for root in roots:
        if root and "://" not in str(root) and Path(root, "result.json").exists():
            return read_jsonl(Path(root, "result.json"))
    return []


class ReplayASHA(ASHAScheduler):
    """ASHA whose rungs are rebuilt from restored trials' results (Tune does not save them)."""

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for r in _trial_history(trial):
            if self._time_attr in r and self._metric in r:
                bracket.on_result(trial, r[self._time_attr], self._metric_op * r[self._metric])


def make_scheduler(cfg: Mapping[str, Any]):
    """ASHA on epochs (`time_attr="epoch"`, so a resumed trial keeps its rungs), or FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    t = cfg["tune"]
    sched = t.get("scheduler") or {}
    if sched.get("name", "asha") == "fifo":
        return FIFOScheduler()

    return ReplayASHA(time_attr="epoch", max_t=int(cfg["method"]["train"]["epochs"]),
                      grace_period=int(sched.get("grace_period", 1)),
                      reduction_factor=float(sched.get("reduction_factor", 2)),
                      brackets=int(sched.get("brackets", 1)))


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_sweep(cfg: dict[str, Any], base_overrides: list[str], resume: str = "auto",
              callbacks: list | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or restore) the sweep described by cfg['tune']; returns a summary dict."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from data_pipeline.write import ensure_betons
    from trainer.recipes import use_gpu

    t = cfg["tune"]
    name, path = sweep_name(cfg), sweep_dir(cfg)
    storage_root = path[: -len(name)].rstrip("/")
    exists = tune.Tuner.can_restore(path) and _has_experiment_state(path)
    if resume == "true" and not exists:
        raise ConfigError(f"resume=true but there is no sweep to restore at {path}")
    if resume == "false" and exists:
        raise ConfigError(f"resume=false but a sweep already exists at {path}; delete it, set tune.name=..., "
                          "or resume it (resume=auto)")
    ensure_betons(cfg["data"], list(cfg["data"]["splits"]), log=log)
    init_ray_for_sweep(cfg)
    import ray

    base = copy.deepcopy(cfg)
    base["tune"]["_sweep_name"] = name
    base["cluster"]["storage_path"] = trials_storage(cfg)
    if base["method"]["name"] == "deacl" and not base["teacher"].get("checkpoint"):
        base["teacher"]["checkpoint"] = ensure_teacher(base, _join(path, "teacher"), log=log)
        validate(base)
    gpu = use_gpu(base)
    concurrency = max_concurrent(cfg, ray.cluster_resources(), gpu)
    meta = {"sweep_name": name, "sweep_dir": path, "base_overrides": base_overrides,
            "teacher_checkpoint": base["teacher"].get("checkpoint") if base["method"]["name"] == "deacl" else None,
            "metric": t.get("metric", "objective"), "mode": t.get("mode", "max"),
            "max_t": int(cfg["method"]["train"]["epochs"]), "space": t["space"], "tune": t,
            "max_concurrent_trials": concurrency, "per_trial": per_trial_resources(cfg, gpu), "config": base}
    if "://" not in path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / SWEEP_FILE).write_text(json.dumps(meta, indent=2, default=str))

    reported = _reported_epochs(path) if exists else {}
    trainable = tune.with_resources(tune.with_parameters(_trial_fn, base=base, reported=reported), {"cpu": 0.01})
    log(f"[tune] sweep {name}: {t.get('num_samples', 1)} sample(s) over {', '.join(t['space'])}; ASHA on epochs "
        f"(max_t={meta['max_t']}); metric {meta['metric']} ({meta['mode']}); {concurrency} trial(s) at once, each "
        f"{meta['per_trial']}; {'restoring' if exists else 'new'} at {path}")
    t0 = time.time()
    if exists:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                   resume_errored=bool(t.get("retry_errored", True)))
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(t["space"]),
            tune_config=tune.TuneConfig(
                metric=meta["metric"], mode=meta["mode"], scheduler=make_scheduler(cfg),
                search_alg=BasicVariantGenerator(random_state=int(t.get("seed", cfg["seed"])), max_concurrent=concurrency),
                num_samples=int(t.get("num_samples", 1)),
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name, reuse_actors=False),
            run_config=tune.RunConfig(name=name, storage_path=storage_root, callbacks=callbacks or [],
                                      verbose=int(t.get("verbose", 1))),
        )
    grid = tuner.fit()
    unfinished = _unfinished_trials(path)
    summary = {"sweep_dir": path, "seconds": time.time() - t0, "trials": len(grid), "errors": grid.num_errors,
               "unfinished": unfinished}
    if unfinished:
        log(f"[tune] sweep interrupted with {unfinished} unfinished trial(s); run the same command again "
            "(or add resume=true) to continue it")
    return summary


def _reported_epochs(path: str) -> dict[str, int]:
    """trial id -> the last epoch in its result.json (what Tune recorded before the interruption)."""
    out: dict[str, int] = {}
    if "://" in path:
        return out
    for result in Path(path).glob("trial_*/result.json"):
        epochs = [int(r["epoch"]) for r in read_jsonl(result) if "epoch" in r]
        out[result.parent.name[len("trial_"):]] = max(epochs, default=0)
    return out


def _has_experiment_state(path: str) -> bool:
    """Tune writes tuner.pkl before the first experiment state; a sweep killed in between restarts."""
    return "://" in path or any(Path(path).glob("experiment_state-*.json"))


def _unfinished_trials(path: str) -> int:
    """Trials not TERMINATED/ERROR in the newest experiment state (0 when unreadable)."""
    if "://" in path:
        return 0
    states = sorted(Path(path).glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    n = 0
    for item in data.get("trial_data", []):
        state = item[0] if isinstance(item, list) else item
        text = state if isinstance(state, str) else json.dumps(state)
        status = json.loads(text).get("status") if text.startswith("{") else None
        if status not in ("TERMINATED", "ERROR"):
            n += 1
    return n


# --------------------------------------------------------------------------- CLI

def split_args(argv: list[str]) -> tuple[list[str], str, bool, bool]:
    overrides, resume, show, analyze = [], "auto", False, True
    for a in argv:
        if a == "--cfg":
            show = True
        elif a.startswith("resume="):
            resume = a.split("=", 1)[1].lower()
            if resume not in ("auto", "true", "false"):
                raise ConfigError(f"resume={resume!r} is invalid: allowed: auto, true, false")
        elif a.startswith("analyze="):
            analyze = a.split("=", 1)[1].lower() in ("1", "true", "yes")
        else:
            overrides.append(a)
    return overrides, resume, show, analyze


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        overrides, resume, show, analyze = split_args(args)
        cfg, base_overrides = compose_sweep(overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if show:
        t = cfg["tune"]
        print(json.dumps({"sweep_dir": sweep_dir(cfg), "base_overrides": base_overrides, "space": t["space"],
                          "metric": t.get("metric", "objective"), "mode": t.get("mode", "max"),
                          "max_t": cfg["method"]["train"]["epochs"], "scheduler": t.get("scheduler"),
                          "num_samples": t.get("num_samples"), "config": cfg}, indent=2, default=str))
        return 0
    try:
        summary = run_sweep(cfg, base_overrides, resume=resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if analyze and "://" not in summary["sweep_dir"]:
        from tune.analyze import analyze as run_analysis

        run_analysis(summary["sweep_dir"])
    return 1 if summary["unfinished"] else 0


if __name__ == "__main__":
    # Run the copy imported as `tune.search`, so that Ray pickles the trainable and the scheduler by
    # reference to this module (not by value from `__main__`, which a restore would replay stale).
    from tune.search import main as _main

    raise SystemExit(_main())
