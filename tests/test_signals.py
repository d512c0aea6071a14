"""Signals and worker death, as a user meets them: `python -m trainer.run` at a tiny budget.

Slow (a subprocess each, a local Ray in it): SIGINT (to the process group, as Ctrl-C in a terminal
sends it) and SIGTERM (to the driver only, as a scheduler or `ray job stop` sends it) stop the
run after the current step with exit status 130 / 143 and one line; the last finished epoch's
checkpoint is registered (the rerun resumes after it, keeping checkpoints_to_keep folders); a
second signal stops at once; the resumed run ends bit for bit where the same command run
uninterrupted ends, and the same run_name with another experiment is refused. A RayTrainWorker
killed with SIGKILL restarts once by default and the run finishes; with cluster.max_failures=0 the
run ends with one line naming the stage, the epoch and the cause, Ray's traceback in a log file,
exit status 1.
Fast: the driver's handler outside a Train run, the worker's stop poll, the cause phrases.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conf import compose
from conftest import ROOT, tiny_overrides

# Enough epochs that a run signalled after epoch 2 is still training when the stop lands (an epoch
# takes under a second here, the stop comes within about two more), few enough that reruns are short.
EPOCHS = 16
LINE = re.compile(r"^interrupted after train epoch (\d+); rerun the same command to resume$", re.M)


# ------------------------------------------------------------------------------------- fast


def test_signal_outside_a_train_run_stops_at_once_with_128_plus_signal():
    from conf import RunStopped
    from trainer import signals

    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        signals.reset()
        try:
            with signals.phase("writing the .beton files"), pytest.raises(RunStopped) as info:
                signals.handle(signum, None)
            assert signals.received() == signum
        finally:
            signals.reset()
        assert info.value.exit_status == status
        assert str(info.value) == "interrupted during writing the .beton files; rerun the same command to resume"


def test_cli_turns_run_stopped_and_early_ctrl_c_into_one_line(capsys):
    from conf import RunStopped
    from conf.cli import cli_main

    def stopped(_):
        raise RunStopped("interrupted after train epoch 3; rerun the same command to resume", 143)

    def ctrl_c(_):
        raise KeyboardInterrupt

    assert cli_main("", [], stopped) == 143
    assert capsys.readouterr().err == "interrupted after train epoch 3; rerun the same command to resume\n"
    assert cli_main("", [], ctrl_c) == 130
    assert capsys.readouterr().err.startswith("interrupted during start-up; rerun the same command")


def test_stop_request_sees_the_marker(tmp_path):
    from trainer import signals
    from trainer.distributed import WorkerContext
    from trainer.worker.stop import StopRequest

    uri = signals.stop_file(f"{tmp_path}/run-train")
    request = StopRequest(uri, WorkerContext(0, 1, None, 1))
    assert not request.requested()
    signals.request_stop(uri)
    request.last = 0.0  # skip the poll interval
    assert request.requested() and request.requested()
    signals.clear_stop(uri)
    assert not Path(uri).exists()
    assert not StopRequest(None, WorkerContext(0, 1, None, 1)).requested()


def test_likely_cause_names_oom_and_dead_processes():
    import ray.exceptions
    from ray.train import WorkerGroupError

    from trainer.launch import likely_cause

    oom = WorkerGroupError("rank 0", {0: ray.exceptions.OutOfMemoryError("Task was killed due to the node "
                                                                             "running low on memory.")})
    assert likely_cause(oom).startswith("out of memory")
    died = WorkerGroupError("rank 0", {0: ray.exceptions.ActorDiedError()})
    assert likely_cause(died).startswith("a worker process died (killed by a signal")
    raised = WorkerGroupError("rank 1", {1: ValueError("bad shape\nlast line")})
    assert likely_cause(raised) == "a worker raised ValueError: last line"


# ------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """Betons written once for this module (digits at 16x16, a quarter of the train split)."""
    from conf import compose
    from data_pipeline.write import ensure_betons

    d = tmp_path_factory.mktemp("betons")
    cfg = compose(_overrides(tmp_path_factory.mktemp("cfg"), d))
    ensure_betons(cfg["data"], list(cfg["data"]["splits"]))
    return d


def _overrides(tmp_path: Path, data_dir: Path, **extra: str) -> list[str]:
    return tiny_overrides(tmp_path, **{
        "method": "simclr", "recipe": "pretrain", "data.beton_dir": str(data_dir), "data.resolution": "16",
        "data.val_fraction": "0.75", "method.train.batch_size": "32", "method.train.optimizer": "sgd",
        "method.train.lr": "0.1", "method.train.epochs": str(EPOCHS), "cluster.cpus_per_worker": "1",
        "eval.protocols": "[]", **extra})


class Job:
    """`python -m trainer.run ...` in its own session (its own process group), output in a file."""

    def __init__(self, tmp_path: Path, overrides: list[str], name: str) -> None:
        self.cmd = [sys.executable, "-m", "trainer.run", *overrides]
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.log_path = tmp_path / f"{name}.log"
        # What `--cfg` prints (tests/test_presets.py checks that path): composed here, no second interpreter.
        self.cfg = cfg = compose(overrides)
        self.ray_dir = Path(cfg["cluster"]["storage_path"]) / f"{cfg['run_name']}-train"
        self.run_dir = Path(cfg["output_dir"]) / cfg["run_name"]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=open(self.log_path, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        t0 = time.time()
        while time.time() - t0 < timeout:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.log()[-3000:]}")

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
            self.proc.wait()
            raise AssertionError(f"did not stop within {timeout}s:\n{self.log()[-3000:]}")


def _registered_epochs(ray_dir: Path) -> list[int]:
    """Epochs of the checkpoints Ray has registered for a run (what a rerun resumes from)."""
    snap = json.loads((ray_dir / "checkpoint_manager_snapshot.json").read_text())
    return [int(r["metrics"]["epoch"]) for r in snap["checkpoint_results"]]


def _stop(job: Job, signum: int, to_group: bool) -> tuple[int, str]:
    job.wait_for(r"\[train\] epoch 2/")
    (os.killpg if to_group else os.kill)(job.proc.pid, signum)
    rc = job.finish()
    return rc, job.log()


@pytest.mark.slow
def test_ctrl_c_stops_after_a_step_registers_the_checkpoint_and_the_rerun_resumes(betons, tmp_path):
    """Ctrl-C (SIGINT to the process group) after epoch 2: exit 130 and one line, that epoch's
    checkpoint registered; the same command again resumes after it (only the interrupted epoch is
    redone), completes, and ends bit for bit where the same command run uninterrupted ends; the same
    run_name with another experiment is refused before anything starts. (This also covers what
    test_fault_tolerance's resubmission test checked: one Ray job fewer in the suite.)"""
    from tests.test_determinism import assert_same_tensors, checkpoint_tensors, metrics
    from trainer.checkpoint import STATE_FILE
    from trainer.recipes import finished_stage

    job = Job(tmp_path, _overrides(tmp_path, betons), "first")
    rc, log = _stop(job, signal.SIGINT, to_group=True)
    lines = LINE.findall(log)
    assert rc == 130 and len(lines) == 1, log[-3000:]
    done = int(lines[0])
    assert "Traceback" not in log, log[-3000:]
    assert 2 <= done < EPOCHS and max(_registered_epochs(job.ray_dir)) == done, log[-3000:]
    assert not (job.run_dir / "results.json").exists(), "the first job was not interrupted"

    second = subprocess.run(job.cmd, cwd=ROOT, env=job.env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"[train] resumed after epoch {done} " in out, out[-3000:]
    kept = [p for p in job.ray_dir.glob("checkpoint_*") if p.is_dir()]
    assert len(kept) <= int(job.cfg["cluster"]["checkpoints_to_keep"]), kept
    assert (job.run_dir / "results.json").exists()
    info = finished_stage(job.run_dir / "train")  # stage.json's paths are relative to the stage folder
    assert info["metrics"]["epoch"] == EPOCHS
    last = max((p for p in Path(info["ray_path"]).glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    state = torch.load(last / STATE_FILE, weights_only=True)
    assert state["epoch"] == EPOCHS and state["resumed_at"] == [done]

    # Bit for bit what the same command gives uninterrupted (another output folder, same run name).
    straight = subprocess.run([sys.executable, "-m", "trainer.run", *_overrides(tmp_path / "straight", betons)],
                              cwd=ROOT, env=job.env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-5000:]
    ref_run = tmp_path / "straight" / "out" / job.cfg["run_name"]
    assert_same_tensors(checkpoint_tensors(job.run_dir / "train"), checkpoint_tensors(ref_run / "train"))
    assert metrics(json.loads((job.run_dir / "results.json").read_text())["evaluations"]) == \
        metrics(json.loads((ref_run / "results.json").read_text())["evaluations"])

    # Same run_name, different experiment: refused before anything starts.
    third = subprocess.run(job.cmd + ["method.train.lr=0.2", f"run_name={job.cfg['run_name']}"], cwd=ROOT,
                           env=job.env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 2 and third.stderr.startswith("config error: run folder") \
        and "config hash" in third.stderr and "Traceback" not in third.stderr, third.stderr


@pytest.mark.slow
def test_sigterm_stops_with_143_and_a_second_signal_stops_at_once(betons, tmp_path):
    job = Job(tmp_path, _overrides(tmp_path, betons), "term")
    rc, log = _stop(job, signal.SIGTERM, to_group=False)
    lines = LINE.findall(log)
    assert rc == 143 and len(lines) == 1 and "Traceback" not in log, log[-3000:]
    assert max(_registered_epochs(job.ray_dir)) == int(lines[0])

    again = Job(tmp_path, _overrides(tmp_path, betons), "twice")  # the same run: it resumes, then two signals
    again.wait_for(r"\[train\] epoch \d+/")
    t0 = time.time()
    os.killpg(again.proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(again.proc.pid, signal.SIGINT)
    rc = again.finish()
    log = again.log()
    assert rc == 130 and time.time() - t0 < 30, log[-3000:]
    assert re.search(r"^interrupted during stage train \(stopped at once: the unfinished epoch is lost\); "
                     r"rerun the same command to resume$", log, re.M), log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def _kill_worker(job: Job) -> int:
    """SIGKILL the RayTrainWorker of the train stage once Ray registered a checkpoint; that epoch."""
    pid = int(job.wait_for(r"\(RayTrainWorker pid=(\d+)\)[^\n]*\[train\] epoch 2/").group(1))
    t0 = time.time()
    while not (job.ray_dir / "checkpoint_manager_snapshot.json").exists() and time.time() - t0 < 60:
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return max(_registered_epochs(job.ray_dir))


@pytest.mark.slow
def test_dead_worker_restarts_once_by_default_then_gives_one_line(betons, tmp_path):
    """Problem 3: a SIGKILLed worker of a local run (default cluster settings) restarts and the run
    finishes; with restarts used up, one line instead of Ray's traceback."""
    job = Job(tmp_path, _overrides(tmp_path, betons), "restart")
    registered = _kill_worker(job)
    rc = job.finish(timeout=300)
    log = job.log()
    assert rc == 0, log[-3000:]  # the behaviour first, then its cause: the local default below
    assert job.cfg["cluster"]["max_failures"] == 1
    resumed = re.search(r"\[train\] resumed after epoch (\d+) ", log)
    assert resumed and int(resumed.group(1)) >= registered >= 1, log[-3000:]
    assert (job.run_dir / "results.json").exists()

    # Another output folder: cluster.* is not part of the run's identity, the run above is finished.
    fail = Job(tmp_path, _overrides(tmp_path / "fail", betons, **{"cluster.max_failures": "0"}), "fail")
    registered = _kill_worker(fail)
    rc = fail.finish()
    log = fail.log()
    line = re.search(r"^stage train failed after epoch (\d+): a worker process died \(.*\); the worker group was "
                     r"restarted 0 time\(s\) \(cluster.max_failures\); Ray's traceback: (\S+); rerun to resume "
                     r"after epoch \1: python -m trainer.run .*$", log, re.M)
    assert rc == 1 and line, log[-3000:]
    assert int(line.group(1)) >= registered >= 1 and Path(line.group(2)) == fail.run_dir / "train_failure.log"
    assert "Traceback" in Path(line.group(2)).read_text()
    assert "Traceback" not in log and "WorkerGroupError" not in log, log[-3000:]
