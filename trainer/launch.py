"""The driver side of a stage: connect to (or start) Ray, then run one TorchTrainer over N workers.

`init_ray(cfg)` picks the cluster: inside `ray job submit` the job's own; `cluster.address` (or
RAY_ADDRESS) an existing cluster, shipping this checkout as the working_dir; otherwise a fresh Ray
in this process. `run_train_stage(cfg, payload, loop, name)` runs one Ray Train run of `loop`
(trainer.worker.pretrain_loop / evaluate_loop) and turns the loop's non-completed outcomes into
exceptions, and Ray Train giving up on a worker group (more than cluster.max_failures failures)
into TrainingFailed with a one-phrase likely cause.

`pin_ray_address` is a `worker_process_setup_hook`: it sets RAY_ADDRESS in every Ray worker process
to the cluster the worker belongs to. Ray Train's PlacementGroupCleaner (which frees the placement
group of a Train run whose controller died, e.g. a trial that ASHA stopped) queries the state API
with an auto-detected address; when several Ray instances run on one host (tests, shared machines)
that detection fails, the group leaks and the next trials wait for CPUs that never come back.
Every Ray worker process imports this module for that hook: it imports nothing heavy at the top.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV_FILE = REPO_ROOT / "cluster" / "runtime_env.yaml"
SETUP_HOOK = "trainer.launch.pin_ray_address"
# Ray Train V2's print patch re-emits every worker print through the logger: each line twice.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def pin_ray_address() -> None:
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def local_runtime_env() -> dict[str, Any]:
    """runtime_env for a Ray started in-process: the repo importable, the address pinned."""
    return {"env_vars": {"PYTHONPATH": str(REPO_ROOT), **WORKER_ENV}, "worker_process_setup_hook": SETUP_HOOK}


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


def init_ray(cfg: Mapping[str, Any], local_cpus: int | None = None) -> None:
    """Connect to (or start) Ray; a local instance gets `local_cpus` CPUs (default: the workers' share)."""
    import ray

    from trainer import signals

    if ray.is_initialized():
        return
    if inside_ray_job():
        ray.init(log_to_driver=True)
        signals.reinstall()  # ray.init replaced the SIGTERM handler
        return
    address = cfg["cluster"]["address"] or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=code_runtime_env())
        signals.reinstall()
        return
    os.environ.update(WORKER_ENV)
    needed = local_cpus or int(cfg["cluster"]["num_workers"]) * int(cfg["cluster"]["cpus_per_worker"])
    # Logical CPUs: the workers' share plus one for Train's controller and Tune's trial actors.
    # address="local": always a fresh instance, never someone else's cluster on this machine.
    ray.init(address="local", num_cpus=needed + 1, log_to_driver=True, runtime_env=local_runtime_env())
    signals.reinstall()


def use_gpu(cfg: Mapping[str, Any]) -> bool:
    value = cfg["cluster"]["use_gpu"]
    if value == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(value)


def run_train_stage(cfg: Mapping[str, Any], payload: Mapping[str, Any], loop: Callable, run_name: str,
                    callbacks: list | None = None, stoppable: bool = False):
    """One Ray Train run (TorchTrainer over cluster.num_workers workers); returns its Result.

    Same (storage_path, run_name) as an earlier run: Ray resumes it from its last checkpoint.
    Raises NonFiniteLossError / RunMismatchError when the workers stopped for those reasons,
    TrainingFailed when the worker group failed more than cluster.max_failures times, and
    (`stoppable`: `loop` honours the payload's `stop_file`, as pretrain_loop does) a signal's
    signals.Interrupted after the workers stopped at a safe point (trainer/signals.py); so it does
    in a Tune trial whose sweep driver wrote the stop marker (trainer/trial_stop.py).
    """
    from trainer import signals
    from trainer.worker.outcome import NonFiniteLossError, RunMismatchError

    path = trainer_path(cfg, run_name)
    stop = signals.stop_file(path)
    signals.clear_stop(stop)  # left by an interrupted earlier attempt of this run
    trainer = build_trainer(cfg, {**payload, "stop_file": stop}, loop, run_name, callbacks)
    result = signals.run_stoppable(lambda: fit(trainer, payload["name"], path), stop if stoppable else None)
    outcome = result.return_value if isinstance(result.return_value, dict) else {}
    if outcome.get("status") == "nonfinite":
        last = result.checkpoint.path if result.checkpoint is not None else None
        err = NonFiniteLossError(f"{outcome['message']} Last good checkpoint: {last}")
        err.result = result
        raise err
    if outcome.get("status") == "mismatch":
        raise RunMismatchError(outcome["message"])
    stopped_at = None
    if outcome.get("status") == "interrupted":
        stopped_at = outcome["epoch"]
    elif stoppable and signals.received() is not None:  # the signal came during the last epoch's report
        stopped_at = (result.metrics or {}).get("epoch", 0)
    if stopped_at is not None:
        if signals.received() is not None:  # this driver got the signal (not a Tune trial its sweep stopped)
            import ray

            ray.shutdown()  # now, not at exit: Ray's shutdown chatter would follow the line
        raise signals.interrupted(f"after {payload['name']} epoch {stopped_at}", int(stopped_at))
    return result


def build_trainer(cfg: Mapping[str, Any], payload: Mapping[str, Any], loop: Callable, run_name: str,
                  callbacks: list | None = None):
    """The TorchTrainer of one stage: scaling, failure and checkpoint settings from cfg["cluster"]."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster = cfg["cluster"]
    gpu = use_gpu(cfg)
    resources = {"CPU": int(cluster["cpus_per_worker"])}
    if gpu:
        resources["GPU"] = float(cluster["gpus_per_worker"])
    backend = cluster["backend"] if cluster["backend"] != "auto" else ("nccl" if gpu else "gloo")
    return TorchTrainer(
        loop, train_loop_config={"cfg": dict(cfg), "stage": dict(payload)},
        torch_config=TorchConfig(backend=backend, timeout_s=int(cluster["timeout_s"])),
        scaling_config=ScalingConfig(num_workers=int(cluster["num_workers"]), use_gpu=gpu,
                                     resources_per_worker=resources, placement_strategy=cluster["placement_strategy"]),
        run_config=RunConfig(name=run_name, storage_path=cluster["storage_path"],
                             failure_config=FailureConfig(max_failures=int(cluster["max_failures"])),
                             checkpoint_config=CheckpointConfig(num_to_keep=int(cluster["checkpoints_to_keep"])),
                             # Train's INFO/WARNING records (placement, the failure policy's decisions,
                             # each with a traceback) stay in Ray's session logs, off the screen.
                             logging_config=LoggingConfig(log_level="ERROR"),
                             callbacks=callbacks or []))


def trainer_path(cfg: Mapping[str, Any], run_name: str) -> str:
    """The storage folder of the Train run `run_name` (checkpoints, Ray's records)."""
    return f"{str(cfg['cluster']['storage_path']).rstrip('/')}/{run_name}"


def fit(trainer: Any, stage: str, path: str):
    """`trainer.fit()`; Ray Train giving up on the worker group becomes TrainingFailed."""
    import ray.train

    from trainer.worker.outcome import TrainingFailed

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        import traceback

        details = "".join(traceback.format_exception(e))
        raise TrainingFailed(stage, registered_epoch(path), likely_cause(e), details) from None


def registered_epoch(path: str) -> int:
    """The epoch of the newest checkpoint Ray registered for the run at `path` (0: none)."""
    import ray.train

    try:
        return int((ray.train.Result.from_path(path).metrics or {}).get("epoch", 0))
    except (RuntimeError, OSError, ValueError):  # no run there yet, or its records unreadable
        return 0


def likely_cause(error: BaseException) -> str:
    """One phrase for why Ray Train gave up, from what Ray says about the failed workers."""
    import re

    import ray.exceptions

    failures = list(getattr(error, "worker_failures", {}).values()) or [getattr(error, "controller_failure", error)]
    text = " ".join(str(f) for f in failures)
    if any(isinstance(f, ray.exceptions.OutOfMemoryError) for f in failures) or "low on memory" in text:
        return "out of memory (Ray's memory monitor killed a worker)"
    if isinstance(failures[0], ray.exceptions.ActorDiedError) or "died unexpectedly" in text:
        code = re.search(r"exit code (\d+)|exited with code (\d+)", text)
        how = f"exit code {next(g for g in code.groups() if g)}" if code else \
            "killed by a signal (SIGKILL, e.g. the kernel's OOM killer) or crashed"
        return f"a worker process died ({how})"
    first = failures[0]
    return f"a worker raised {type(first).__name__}: {str(first).strip().splitlines()[-1][:200] if str(first).strip() else ''}"
