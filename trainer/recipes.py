"""Recipes: ordered stages, each one Ray Train run, each handing the next its checkpoint path.

    deacl    : teacher (SimCLR by default) -> student (DeACL) -> evaluate both
    pretrain : the configured method -> evaluate it
    evaluate : evaluate an existing checkpoint (+checkpoint=...)

A stage whose `model.pt` (and `stage.json`) already exist in the run folder is skipped, and a
stage interrupted mid-way resumes from its last Ray checkpoint (same storage path and name).

Resubmitting the same config resumes it: run names derive from the config hash. The run folder
records that hash (`run.json`); a different config under the same run_name is refused
(RunMismatchError) instead of silently continuing someone else's run.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.checkpoint import MODEL_FILE
from trainer.config import ConfigError, config_hash
from tune.ray_env import WORKER_ENV, local_runtime_env

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV_FILE = REPO_ROOT / "cluster" / "runtime_env.yaml"
RUN_FILE = "run.json"


@dataclass
class Stage:
    name: str
    kind: str  # "pretrain" | "evaluate"
    method: dict[str, Any] | None = None
    needs: list[str] = field(default_factory=list)  # names of stages whose model this one uses
    label: str = ""


def resolve_recipe(cfg: dict[str, Any]) -> str:
    if cfg["recipe"] != "auto":
        return cfg["recipe"]
    return "deacl" if cfg["method"]["name"] == "deacl" else "pretrain"


def plan(cfg: dict[str, Any]) -> list[Stage]:
    recipe = resolve_recipe(cfg)
    if recipe == "evaluate":
        return [Stage("evaluate_model", "evaluate", needs=["checkpoint"], label=cfg["eval"].get("label") or "model")]
    if recipe == "deacl":
        stages = []
        if not cfg["teacher"].get("checkpoint"):
            stages.append(Stage("teacher", "pretrain", method=cfg["teacher"]["method"], label="teacher"))
        stages += [Stage("student", "pretrain", method=cfg["method"], needs=["teacher"], label="student"),
                   Stage("evaluate_teacher", "evaluate", needs=["teacher"], label="teacher"),
                   Stage("evaluate_student", "evaluate", needs=["student"], label="student")]
        return stages
    return [Stage("train", "pretrain", method=cfg["method"], label=cfg["method"]["name"]),
            Stage("evaluate", "evaluate", needs=["train"], label=cfg["method"]["name"])]


def run_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["output_dir"]) / cfg["run_name"]


def inside_ray_job() -> bool:
    """True in the entrypoint of `ray job submit` (the job supervisor sets this variable)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def code_runtime_env() -> dict[str, Any]:
    """Ship this checkout to the cluster: working_dir = repo root, excludes as documented in
    cluster/runtime_env.yaml (the same file `ray job submit --runtime-env` uses)."""
    import yaml

    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text()) if RUNTIME_ENV_FILE.exists() else {}
    env = dict(env or {})
    env["working_dir"] = str(REPO_ROOT)
    env["env_vars"] = {**WORKER_ENV, **dict(env.get("env_vars") or {})}
    return env


def init_ray(cfg: dict[str, Any]) -> None:
    """Connect to (or start) Ray.

    - inside `ray job submit`: the job's cluster; code and env come with the job's runtime env;
    - cluster.address (or RAY_ADDRESS) set: that cluster, shipping this checkout as working_dir;
    - otherwise: a Ray instance in this process sized for the configured workers.
    """
    import ray

    if ray.is_initialized():
        return
    cluster = cfg["cluster"]
    if inside_ray_job():
        ray.init(log_to_driver=True)
        return
    address = cluster.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=code_runtime_env())
        return
    os.environ.update(WORKER_ENV)
    needed = int(cluster["num_workers"]) * int(cluster["cpus_per_worker"])
    # Logical CPUs: the workers' share plus one for Train's controller and Tune's trial actors.
    # address="local": always a fresh instance, never someone else's cluster on this machine.
    # The setup hook pins RAY_ADDRESS in every worker, so Train's placement-group cleaner talks to
    # this instance even when other Ray instances run on the same host (tune/ray_env.py).
    ray.init(address="local", num_cpus=needed + 1, log_to_driver=True, runtime_env=local_runtime_env())


def use_gpu(cfg: dict[str, Any]) -> bool:
    value = cfg["cluster"]["use_gpu"]
    if value == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(value)


def run_train_stage(cfg: dict[str, Any], stage_dict: dict[str, Any], loop: Callable, run_name: str,
                    callbacks: list | None = None):
    """One Ray Train run (TorchTrainer over cluster.num_workers workers); returns its Result.

    Same (storage_path, run_name) as an earlier run: Ray resumes it from its last checkpoint.
    Raises NonFiniteLossError / RunMismatchError when the workers stopped for those reasons.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.train_loop import NonFiniteLossError, RunMismatchError

    cluster = cfg["cluster"]
    gpu = use_gpu(cfg)
    resources = {"CPU": int(cluster["cpus_per_worker"])}
    if gpu:
        resources["GPU"] = float(cluster.get("gpus_per_worker", 1))
    backend = cluster.get("backend", "auto")
    if backend == "auto":
        backend = "nccl" if gpu else "gloo"
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg, "stage": stage_dict},
        torch_config=TorchConfig(backend=backend, timeout_s=int(cluster.get("timeout_s", 1800))),
        scaling_config=ScalingConfig(num_workers=int(cluster["num_workers"]), use_gpu=gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cluster["placement_strategy"]),
        run_config=RunConfig(name=run_name, storage_path=cluster["storage_path"],
                             failure_config=FailureConfig(max_failures=int(cluster["max_failures"])),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=int(cluster.get("checkpoints_to_keep", 2))),
                             callbacks=callbacks or []),
    )
    result = trainer.fit()
    outcome = result.return_value if isinstance(result.return_value, dict) else {}
    if outcome.get("status") == "nonfinite":
        last = result.checkpoint.path if result.checkpoint is not None else None
        err = NonFiniteLossError(f"{outcome['message']} Last good checkpoint: {last}")
        err.result = result
        raise err
    if outcome.get("status") == "mismatch":
        raise RunMismatchError(outcome["message"])
    return result


def check_run_setup(cfg: dict[str, Any]) -> None:
    """Refuse setups that would lose results or resume the wrong run (nothing started yet)."""
    if inside_ray_job():
        cwd = Path.cwd().resolve()
        out = Path(cfg["output_dir"]).resolve()
        if out == cwd or cwd in out.parents:
            raise ConfigError(
                f"output_dir={cfg['output_dir']!r} is inside the job's temporary working_dir ({cwd}): "
                "results would be lost and the run name would change with every code change; "
                "set output_dir (and cluster.storage_path) to an absolute path on shared storage")
    debug = cfg["cluster"].get("debug") or {}
    for key in ("fail_at_epoch", "nonfinite_at_epoch"):
        v = debug.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"cluster.debug.{key}={v!r} is invalid: must be null or an epoch number >= 1")


def claim_run_dir(cfg: dict[str, Any], out: Path) -> None:
    """Record the config hash in the run folder; refuse a run folder made by another config."""
    from trainer.train_loop import RunMismatchError

    h = config_hash(cfg)
    marker = out / RUN_FILE
    previous = None
    if marker.exists():
        previous = json.loads(marker.read_text()).get("config_hash")
    elif (out / "config.json").exists():  # a run folder written before run.json existed
        previous = config_hash(json.loads((out / "config.json").read_text()))
    if previous is not None and previous != h:
        raise RunMismatchError(
            f"run folder {out} belongs to a run with config hash {previous}, but this config hashes to {h} "
            f"(run_name={cfg['run_name']!r}). Resuming it would mix two experiments. Leave run_name unset "
            "(it is derived from the config hash), choose a new run_name, or delete that folder.")
    if previous is None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(RUN_FILE + ".tmp")
        tmp.write_text(json.dumps({"run_name": cfg["run_name"], "config_hash": h,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
        os.replace(tmp, marker)


def _copy_final_model(result, dest: Path) -> Path:
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run at {result.path} finished without a checkpoint; "
                           "delete that folder to start the stage again")
    dest.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for name in os.listdir(d):
            shutil.copy2(os.path.join(d, name), dest / (name + ".tmp"))
            os.replace(dest / (name + ".tmp"), dest / name)
    return dest / MODEL_FILE


def run_recipe(cfg: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage of the configured recipe; write results.json/csv; return the results."""
    from data_pipeline.write import ensure_betons
    from trainer.evaluation.protocols import evaluate_loop
    from trainer.train_loop import pretrain_loop

    out = run_dir(cfg)
    check_run_setup(cfg)
    claim_run_dir(cfg, out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    ensure_betons(cfg["data"], list(cfg["data"]["splits"]), log=log)
    init_ray(cfg)
    artifacts: dict[str, str] = {}
    if cfg["teacher"].get("checkpoint"):
        artifacts["teacher"] = cfg["teacher"]["checkpoint"]
    if cfg.get("checkpoint"):
        artifacts["checkpoint"] = str(Path(cfg["checkpoint"]).absolute())
    evaluations: dict[str, dict[str, float]] = {}
    t_start = time.time()
    for stage in plan(cfg):
        stage_out = out / stage.name
        done = stage_out / "stage.json"
        if done.exists():
            info = json.loads(done.read_text())
            log(f"[recipe] stage {stage.name}: already complete, reusing {info.get('model_path', stage_out)}")
            if info.get("model_path"):
                artifacts[stage.name] = info["model_path"]
            if info.get("metrics") and stage.kind == "evaluate":
                evaluations[stage.label] = info["metrics"]
            continue
        t0 = time.time()
        log(f"[recipe] stage {stage.name} ({stage.kind}) starting")
        if stage.kind == "pretrain":
            kwargs = {}
            if stage.method["name"] == "deacl":
                kwargs["teacher_path"] = artifacts["teacher"]
            stage_dict = {"name": stage.name, "method": stage.method, "method_kwargs": kwargs}
            result = run_train_stage(cfg, stage_dict, pretrain_loop, f"{cfg['run_name']}-{stage.name}")
            model_path = _copy_final_model(result, stage_out)
            artifacts[stage.name] = str(model_path)
            info = {"model_path": str(model_path), "metrics": result.metrics,
                    "seconds": time.time() - t0, "ray_path": result.path}
        else:
            stage_dict = {"name": stage.name, "model_path": artifacts[stage.needs[0]],
                          "protocols": list(cfg["eval"]["protocols"]), "label": stage.label}
            result = run_train_stage(cfg, stage_dict, evaluate_loop, f"{cfg['run_name']}-{stage.name}")
            _copy_final_model_dir(result, stage_out)
            metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
            evaluations[stage.label] = metrics
            info = {"model_path": None, "evaluated": stage_dict["model_path"], "metrics": metrics,
                    "seconds": time.time() - t0, "ray_path": result.path}
        stage_out.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(info, indent=2, default=str))
        log(f"[recipe] stage {stage.name} done in {time.time() - t0:.0f}s")
    results = {"run_name": cfg["run_name"], "run_dir": str(out), "artifacts": artifacts,
               "evaluations": evaluations, "seconds": time.time() - t_start}
    write_results(out, results, cfg)
    return results


def _copy_final_model_dir(result, dest: Path) -> None:
    if result.checkpoint is not None:
        _copy_final_model(result, dest)


def results_rows(evaluations: dict[str, dict[str, float]], protocols: list[str]) -> list[dict[str, Any]]:
    rows = []
    for label, m in evaluations.items():
        for p in protocols:
            if f"{p}_sa" not in m:
                continue
            rows.append({"model": label, "protocol": p.upper(), "SA": 100 * m[f"{p}_sa"],
                         "RA_PGD": 100 * m[f"{p}_ra"],
                         "AA": 100 * m[f"{p}_aa"] if f"{p}_aa" in m else None,
                         "AA_n": int(m[f"{p}_aa_n"]) if f"{p}_aa_n" in m else None,
                         "n_test": int(m.get(f"{p}_n_test", 0))})
    return rows


def format_table(rows: list[dict[str, Any]], pgd_steps: int) -> str:
    head = f"{'model':<12}{'protocol':<10}{'SA':>8}{f'RA(PGD-{pgd_steps})':>14}{'AA':>8}{'AA n':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        aa = f"{r['AA']:8.2f}" if r["AA"] is not None else f"{'-':>8}"
        lines.append(f"{r['model']:<12}{r['protocol']:<10}{r['SA']:8.2f}{r['RA_PGD']:14.2f}{aa}"
                     f"{(r['AA_n'] or 0):7d}")
    return "\n".join(lines)


def paper_rows(rows: list[dict[str, Any]], protocols: list[str]) -> list[dict[str, Any]]:
    """One row per model with SA / RA / AA per protocol (the papers' table layout)."""
    wide: dict[str, dict[str, Any]] = {}
    for r in rows:
        w = wide.setdefault(r["model"], {"model": r["model"]})
        p = r["protocol"]
        w[f"{p}_SA"], w[f"{p}_RA"], w[f"{p}_AA"] = r["SA"], r["RA_PGD"], r["AA"]
    cols = ["model"] + [f"{p.upper()}_{m}" for p in protocols for m in ("SA", "RA", "AA")]
    return [{c: w.get(c) for c in cols} for w in wide.values()]


def format_paper_table(rows: list[dict[str, Any]], protocols: list[str], pgd_steps: int) -> str:
    """Models as rows, protocols as column groups of SA / RA (PGD-n) / AA, in percent."""
    protocols = [p for p in protocols if any(r["protocol"] == p.upper() for r in rows)]
    wide = paper_rows(rows, protocols)
    name_w = max([12] + [len(str(w["model"])) + 2 for w in wide])
    group_w = 3 * 8
    top = " " * name_w + "".join(f"{p.upper():^{group_w}}|" for p in protocols)
    sub = f"{'model':<{name_w}}" + "".join(f"{'SA':>8}{'RA':>8}{'AA':>8}|" for _ in protocols)
    lines = [top, sub, "-" * len(sub)]
    for w in wide:
        cells = []
        for p in protocols:
            for m in ("SA", "RA", "AA"):
                v = w[f"{p.upper()}_{m}"]
                cells.append(f"{v:8.2f}" if v is not None else f"{'-':>8}")
            cells.append("|")
        lines.append(f"{str(w['model']):<{name_w}}" + "".join(cells))
    lines.append(f"SA: clean accuracy, RA: PGD-{pgd_steps} robust accuracy (full test split), "
                 "AA: AutoAttack robust accuracy (subset, see AA_n in the CSV); all in %.")
    return "\n".join(lines)


def write_results(out: Path, results: dict[str, Any], cfg: dict[str, Any]) -> None:
    rows = results_rows(results["evaluations"], list(cfg["eval"]["protocols"]))
    results["table"] = rows
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "protocol", "SA", "RA_PGD", "AA", "AA_n", "n_test"])
        w.writeheader()
        w.writerows(rows)
    # The same numbers in the papers' layout: one row per model, SA / RA / AA per protocol.
    wide = paper_rows(rows, list(cfg["eval"]["protocols"]))
    with open(out / "results_paper.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(wide[0]) if wide else ["model"])
        w.writeheader()
        w.writerows(wide)
