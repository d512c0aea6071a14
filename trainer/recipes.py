"""Recipes: ordered stages, each one Ray Train run, each handing the next its checkpoint path.

    deacl    : teacher (SimCLR by default) -> student (DeACL) -> evaluate both
    pretrain : the configured method -> evaluate it
    evaluate : evaluate an existing checkpoint (checkpoint=...)

`stage_payload` builds what a stage's workers receive and `run_stage` runs a stage once: a stage
whose `stage.json` exists in its folder is reused once its files verify against the folder's
manifest (a damaged folder is moved aside and recopied from the Ray run or rerun), an interrupted
one resumes from its last intact Ray checkpoint (same storage path and name). Recipes and Tune sweeps both go through these two.

Resubmitting the same config resumes it: run names derive from the config hash. The run folder
records that hash (`run.json`); a different config under the same run_name is refused
(RunMismatchError) instead of silently continuing someone else's run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from conf import ConfigError, RunStopped, config_hash, invalid, legacy_config_hash
from conf.cli import command_line
from conf.rules import bundled
from data_pipeline.write import beton_path, ensure_betons
from trainer import signals
from trainer.checkpoint import (MODEL_FILE, copy_checkpoint_files, move_aside, read_manifest,
                                verify_checkpoint)
from trainer.evaluation.datasets import check_eval_inputs, ensure_eval_betons, surrogate_path
from trainer.launch import init_ray, inside_ray_job, run_train_stage
from trainer.results import write_results
from trainer.storage import copy_file, fs_path, is_dir, is_uri, location, storage_fs
from trainer.worker import RunMismatchError, evaluate_loop, pretrain_loop
from trainer.worker.outcome import TrainingFailed
from trainer.worker.resume import registered_checkpoints

RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
STAGE_PATHS = ("model_path", "evaluated", "ray_path")  # stored relative to the stage folder (URIs as given)


@dataclass
class Stage:
    name: str
    kind: str  # "pretrain" | "evaluate"
    method: dict[str, Any] | None = None
    needs: list[str] = field(default_factory=list)  # names of stages whose model this one uses
    label: str = ""


def resolve_recipe(cfg: Mapping[str, Any]) -> str:
    if cfg["recipe"] != "auto":
        return cfg["recipe"]
    return "deacl" if cfg["method"]["name"] == "deacl" else "pretrain"


def plan(cfg: Mapping[str, Any]) -> list[Stage]:
    recipe = resolve_recipe(cfg)
    if recipe == "evaluate":
        return [Stage("evaluate_model", "evaluate", needs=["checkpoint"], label=cfg["eval"]["label"] or "model")]
    if recipe == "deacl":
        stages = []
        if not cfg["teacher"]["checkpoint"]:
            stages.append(Stage("teacher", "pretrain", method=cfg["teacher"]["method"], label="teacher"))
        return stages + [Stage("student", "pretrain", method=cfg["method"], needs=["teacher"], label="student"),
                         Stage("evaluate_teacher", "evaluate", needs=["teacher"], label="teacher"),
                         Stage("evaluate_student", "evaluate", needs=["student"], label="student")]
    return [Stage("train", "pretrain", method=cfg["method"], label=cfg["method"]["name"]),
            Stage("evaluate", "evaluate", needs=["train"], label=cfg["method"]["name"])]


def run_dir(cfg: Mapping[str, Any]) -> Path:
    return Path(cfg["output_dir"]) / cfg["run_name"]


def initial_artifacts(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The models a run starts from: a given teacher, the checkpoint to evaluate."""
    out = {}
    if cfg["teacher"]["checkpoint"]:
        out["teacher"] = cfg["teacher"]["checkpoint"]
    if cfg["checkpoint"]:
        out["checkpoint"] = cfg["checkpoint"]
    return out


def stage_payload(cfg: Mapping[str, Any], stage: Stage, artifacts: Mapping[str, str]) -> dict[str, Any]:
    """What the stage's workers receive besides the config (`config["stage"]` of the worker loops)."""
    if stage.kind == "evaluate":
        return {"name": stage.name, "model_path": artifacts[stage.needs[0]],
                "protocols": list(cfg["eval"]["protocols"]), "label": stage.label,
                "surrogate": surrogate_path(cfg, artifacts)}
    kwargs = {"teacher_path": artifacts["teacher"]} if stage.method["name"] == "deacl" else {}
    identity = {"config_hash": identity_hash(cfg), "run_name": cfg["run_name"], "recipe": resolve_recipe(cfg),
                "stage": stage.name, "method": stage.method["name"]}
    return {"name": stage.name, "method": stage.method, "method_kwargs": kwargs, "identity": identity}


def identity_hash(cfg: Mapping[str, Any]) -> str:
    """The config hash this run's folder and checkpoints carry: today's, or the legacy one for a run
    started before paths under output_dir left the hash (so that run's checkpoints still resume)."""
    recorded = recorded_hash(run_dir(cfg))
    return recorded if recorded == legacy_config_hash(cfg) else config_hash(cfg)


def recorded_hash(out: Path) -> str | None:
    """The config hash the run folder `out` records in its run.json (None: no run there yet)."""
    marker = out / RUN_FILE
    return json.loads(marker.read_text()).get("config_hash") if marker.exists() else None


def finished_stage(stage_dir: Path) -> dict[str, Any] | None:
    """The record of a finished stage in `stage_dir` (None: not finished). Its model path is stored
    relative to `stage_dir`, so a moved or copied outputs folder reuses its own files; a legacy absolute
    path that no longer exists falls back to the file of that name in `stage_dir`."""
    done = stage_dir / STAGE_FILE
    if not done.exists():
        return None
    info = json.loads(done.read_text())
    for key in STAGE_PATHS:
        if info.get(key) and not is_uri(info[key]):  # s3://...: Ray's remote storage, kept as it is
            path = Path(info[key])
            if key == "model_path" and path.is_absolute() and not path.exists():
                path = Path(path.name)  # a legacy record of a folder that has moved since
            info[key] = str(path) if path.is_absolute() else os.path.normpath(stage_dir / path)
    return info


def stage_record(info: Mapping[str, Any], stage_dir: Path, output_dir: str) -> dict[str, Any]:
    """`info` as stage.json stores it: paths inside output_dir relative to `stage_dir`."""
    out = Path(output_dir).absolute()
    stored = dict(info)
    for key in STAGE_PATHS:
        path = Path(str(info.get(key) or "")).absolute()
        if info.get(key) and not is_uri(info[key]) and (path == out or out in path.parents):
            stored[key] = os.path.relpath(path, stage_dir.absolute())
    return stored


def copy_checkpoint_dir(src: str | os.PathLike, dest: Path) -> None:
    """The files of a checkpoint folder (a local path or a URI: s3://...) into `dest`, each atomically,
    its manifest last; then verified (a full disk or a damaged source stops here, not when the next
    stage loads the model)."""
    dest.mkdir(parents=True, exist_ok=True)
    src_fs, src_path = storage_fs(src)
    copy_checkpoint_files(src_path, dest, src_fs=src_fs)
    problem = verify_checkpoint(dest, legacy_ok=True)
    if problem:
        raise RuntimeError(f"copying the checkpoint {src} into {dest} gave a damaged copy ({problem}); "
                           "check the free disk space and rerun the same command")


def _copy_checkpoint(result: Any, dest: Path) -> None:
    """The files of a Ray run's final checkpoint into `dest` (copy_checkpoint_dir)."""
    with result.checkpoint.as_directory() as d:
        copy_checkpoint_dir(d, dest)


def stage_problem(stage_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the record of the finished stage in `stage_dir` or None, what is wrong with the folder or None):
    an unreadable stage.json, a missing model, a file that fails its manifest (or, without one, does
    not load)."""
    try:
        info = finished_stage(stage_dir)
    except (OSError, ValueError, TypeError, AttributeError) as e:  # ValueError: JSONDecodeError
        return None, f"{STAGE_FILE}: unreadable ({type(e).__name__})"
    if info is None:
        return None, None
    model = info.get("model_path")
    if model and not Path(model).exists():
        return info, f"{Path(model).name}: missing"
    return info, verify_checkpoint(stage_dir, legacy_ok=True)


def reusable_stage(stage: Stage, stage_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The record of `stage` if its folder holds it finished and intact. A damaged folder is moved aside
    (`<stage>.damaged-<n>`, never deleted); its models are recopied from the Ray run's final checkpoint
    when that one verifies, else the stage runs again (None)."""
    info, problem = stage_problem(stage_dir)
    if problem is None:
        return info
    moved = move_aside(stage_dir, problem)
    source = final_ray_checkpoint(info) if info is not None and stage.kind == "pretrain" else None
    if source is not None:
        copy_checkpoint_dir(source, stage_dir)
        copy_file(moved / STAGE_FILE, stage_dir / STAGE_FILE)  # its paths are relative to this folder
        log(f"[recipe] stage {stage.name}: {stage_dir} is damaged ({problem}); moved aside to {moved.name} "
            f"and recopied from the Ray checkpoint {source}")
        return finished_stage(stage_dir)
    log(f"[recipe] stage {stage.name}: {stage_dir} is damaged ({problem}); moved aside to {moved.name}; "
        "the stage runs again")
    return None


def final_ray_checkpoint(info: Mapping[str, Any]) -> str | None:
    """The newest registered checkpoint of the stage's Ray run (local or remote storage: its path or
    URI) if it verifies and holds the stage's last epoch (what its run folder was copied from), else None."""
    if not info.get("ray_path"):
        return None
    fs, ray_path = storage_fs(str(info["ray_path"]))
    names = registered_checkpoints(ray_path, fs) if is_dir(fs, ray_path) else None
    if not names:
        return None
    newest = fs_path(ray_path, fs) / max(names)
    if verify_checkpoint(newest, fs=fs) is not None:
        return None
    epoch = read_manifest(newest, fs).get("epoch")
    return location(fs, newest) if epoch == (info.get("metrics") or {}).get("epoch", epoch) else None


def run_stage(cfg: Mapping[str, Any], stage: Stage, artifacts: Mapping[str, str], stage_dir: Path, run_name: str,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `stage` as one Ray Train run unless `stage_dir` records it finished; returns its record:
    model_path (pretrain), metrics, seconds, ray_path."""
    info = reusable_stage(stage, stage_dir, log)
    if info is not None:
        log(f"[recipe] stage {stage.name}: already complete, reusing {info.get('model_path') or stage_dir}")
        return info
    t0 = time.time()
    log(f"[recipe] stage {stage.name} ({stage.kind}) starting")
    init_ray(cfg)
    loop = pretrain_loop if stage.kind == "pretrain" else evaluate_loop
    try:
        with signals.phase(f"stage {stage.name}"):
            result = run_train_stage(cfg, stage_payload(cfg, stage, artifacts), loop, run_name,
                                     stoppable=stage.kind == "pretrain")
    except TrainingFailed as e:  # restarts used up: one line, Ray's traceback beside the stage folder
        raise stage_failed(e, stage_dir.parent, cfg) from None
    if result.checkpoint is None and stage.kind == "pretrain":
        raise RuntimeError(f"the Ray Train run at {result.path} finished without a checkpoint; "
                           "delete that folder to start the stage again")
    if result.checkpoint is not None:
        _copy_checkpoint(result, stage_dir)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    info = {"model_path": str(stage_dir / MODEL_FILE) if stage.kind == "pretrain" else None, "metrics": metrics,
            "seconds": time.time() - t0, "ray_path": location(result.filesystem, result.path)}
    if stage.kind == "evaluate":
        info["evaluated"] = artifacts[stage.needs[0]]
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / (STAGE_FILE + ".tmp")
    tmp.write_text(json.dumps(stage_record(info, stage_dir, cfg["output_dir"]), indent=2, default=str))
    os.replace(tmp, stage_dir / STAGE_FILE)
    log(f"[recipe] stage {stage.name} done in {time.time() - t0:.0f}s")
    return info


def preflight(cfg: Mapping[str, Any]) -> None:
    """Refuse setups that would lose results or fail after Ray started (nothing started yet)."""
    if inside_ray_job():
        cwd, out = Path.cwd().resolve(), Path(cfg["output_dir"]).resolve()
        if out == cwd or cwd in out.parents:
            raise ConfigError(
                f"output_dir={cfg['output_dir']!r} is inside the job's temporary working_dir ({cwd}): "
                "results would be lost and the run name would change with every code change; "
                "set output_dir (and cluster.storage_path) to an absolute path on shared storage")
    check_eval_inputs(cfg)
    data = cfg["data"]
    if bundled(data) or data["download"]:
        return
    missing = [s for s in data["splits"] if not beton_path(data, s).exists()]
    if missing and (not data["root"] or not Path(data["root"]).exists()):
        raise invalid("data.root", data["root"], f"no .beton for split(s) {missing} in {data['beton_dir']} and "
                      "the dataset root does not exist; set data.root to the dataset folder or data.download=true")


def claim_run_dir(cfg: Mapping[str, Any], out: Path) -> None:
    """Record the config hash in the run folder; refuse a run folder made by another config."""
    h = config_hash(cfg)
    marker = out / RUN_FILE
    previous = recorded_hash(out)
    if previous is not None and previous not in (h, legacy_config_hash(cfg)):
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


def stage_failed(error: TrainingFailed, out: Path, cfg: Mapping[str, Any]) -> RunStopped:
    """The one line of a stage whose worker group kept dying; Ray's traceback goes to a log file in
    the run folder `out` (appended: each failure of the run keeps its own)."""
    log_file = out / f"{error.stage}_failure.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        f.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} stage {error.stage}, epoch {error.epoch}: "
                f"{error.cause}\n{error.details}\n")
    restarts = int(cfg["cluster"]["max_failures"])
    tried = "restarted without limit" if restarts < 0 else f"restarted {restarts} time(s) (cluster.max_failures)"
    return RunStopped(f"stage {error.stage} failed after epoch {error.epoch}: {error.cause}; the worker group was "
                      f"{tried}; Ray's traceback: {log_file}; rerun to resume after epoch {error.epoch}: "
                      f"{command_line()}", 1)


def run_recipe(cfg: Mapping[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage of the configured recipe; write results.json/csv; return the results."""
    out = run_dir(cfg)
    preflight(cfg)
    claim_run_dir(cfg, out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    with signals.phase("writing the .beton files"):
        ensure_betons(cfg["data"], list(cfg["data"]["splits"]), log=log)
        ensure_eval_betons(cfg, log=log)
    artifacts = initial_artifacts(cfg)
    evaluations: dict[str, dict[str, float]] = {}
    t_start = time.time()
    for stage in plan(cfg):
        info = run_stage(cfg, stage, artifacts, out / stage.name, f"{cfg['run_name']}-{stage.name}", log=log)
        if info.get("model_path"):
            artifacts[stage.name] = info["model_path"]
        if stage.kind == "evaluate":
            evaluations[stage.label] = info["metrics"]
    results = {"run_name": cfg["run_name"], "run_dir": str(out), "artifacts": artifacts,
               "evaluations": evaluations, "seconds": time.time() - t_start}
    write_results(out, results, cfg)
    return results
