"""The stop paths beyond a single `python -m trainer.run`: Tune trials and `ray job stop`.

Slow (a subprocess each, a local Ray in it, tiny budgets):
- SIGINT to `python -m tune.search` (its process group, as Ctrl-C sends it) stops every running
  trial's Train run between steps: exit 130 and one line; each trial's last epoch in result.json
  is its newest registered checkpoint. Rerunning the same command restores the sweep and every
  trial's result.json lists each epoch exactly once — also for a trial whose result.json was
  lost (Tune recorded none of its epochs: they are replayed from the checkpoint's history).
- SIGTERM to `python -m trainer.run seeds=[0,1]` (its seeds run as Tune trials): exit 143, one
  line, each seed's Train run stopped at a registered epoch; the rerun resumes each after it.
- `ray job stop` of a job submitted with `ray job submit`: the job's log has the
  `interrupted after train epoch N; ...` line, epoch N is registered, resubmitting resumes after N.
Fast: the restored sweep's replay point of a trial without result.json.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides

try:  # the `ray start --head` fixture of tests/test_job_submit.py (if it moved to conftest.py, found there)
    from test_job_submit import RAY, ray_head  # noqa: F401
except ImportError:  # pragma: no cover
    RAY = str(Path(sys.executable).parent / "ray")

ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


# ------------------------------------------------------------------------------------- fast


def test_restored_trial_without_result_json_replays_from_epoch_0(tmp_path):
    from tune.search import replay_point, reported_epochs

    (tmp_path / "trial_a").mkdir()
    (tmp_path / "trial_a" / "result.json").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (tmp_path / "trial_b").mkdir()  # Tune recorded none of b's epochs (its Train run may be at epoch 2)
    reported = reported_epochs(str(tmp_path))
    assert reported == {"a": 2}
    assert replay_point(reported, "a") == 2 and replay_point(reported, "b") == 0
    assert replay_point(None, "b") is None  # a new sweep: nothing to replay
    assert reported_epochs("s3://bucket/sweep") is None  # unreadable here: nothing replayed


def test_a_restored_trials_stored_records_seed_its_new_staging_folder(tmp_path):
    import pyarrow.fs

    from tune.records import restore_records

    fs = pyarrow.fs.LocalFileSystem()
    stored, staging = tmp_path / "sweep" / "trial_a", tmp_path / "session" / "trial_a"
    stored.mkdir(parents=True)
    (stored / "result.json").write_text('{"epoch": 1}\n')
    (stored / "progress.csv").write_text("epoch\n1\n")
    assert restore_records(str(staging), str(stored), fs) == ["result.json", "progress.csv"]
    assert (staging / "result.json").read_text() == '{"epoch": 1}\n'
    (staging / "result.json").write_text('{"epoch": 1}\n{"epoch": 2}\n')  # the same session appended
    assert restore_records(str(staging), str(stored), fs) == []
    assert (staging / "result.json").read_text().count("epoch") == 2
    (stored / "result.json").unlink()  # no stored result.json: every epoch is replayed, so no stale csv
    assert restore_records(str(tmp_path / "other"), str(stored), fs) == []
    assert not (tmp_path / "other" / "progress.csv").exists()


# ------------------------------------------------------------------------------------- slow


def _registered(run: Path) -> list[int]:
    """Epochs of the checkpoints Ray registered for the Train run stored at `run`."""
    try:
        return [int(r["metrics"]["epoch"]) for r in
                json.loads((run / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):  # not there yet, or being rewritten
        return []


def _checkpoint_folders(run: Path) -> list[Path]:
    return [p for p in run.glob("checkpoint_*") if p.is_dir()]


class Proc:
    """A command in its own session (process group), its output in a file."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log_path = log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, predicate, timeout: float = 400) -> None:
        t0 = time.time()
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"ended (rc {self.proc.returncode}) too early:\n{self.log()[-4000:]}")
            if time.time() - t0 > timeout:
                self.kill()
                raise AssertionError(f"timed out:\n{self.log()[-4000:]}")
            time.sleep(0.3)

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not stop within {timeout}s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
        except ProcessLookupError:
            pass
        self.proc.wait()


def _epochs(result_json: Path) -> list[int]:
    if not result_json.exists():
        return []
    return [int(json.loads(line)["epoch"]) for line in result_json.read_text().splitlines()
            if line.strip() and "epoch" in json.loads(line)]


@pytest.mark.slow
def test_ctrl_c_stops_every_trial_between_steps_and_the_rerun_repeats_no_epoch(tmp_path):
    from conf import compose
    from trainer.checkpoint import save_model
    from trainer.models import build_encoder

    epochs = 5
    tiny = [o for o in tiny_overrides(tmp_path) if not o.startswith(("method.train.epochs", "monitor.knn"))]
    plain = compose(tiny)
    teacher = tmp_path / "teacher.pt"  # random weights: the trials' path is the same without training one
    save_model(teacher, build_encoder(plain["model"], plain["data"]["stats"], with_projector=False),
               plain["model"], plain["data"]["stats"])
    cmd = [sys.executable, "-m", "tune.search", "tune=demo", *tiny, f"teacher.checkpoint={teacher}",
           f"method.train.epochs={epochs}", "tune.num_samples=2", "tune.max_concurrent_trials=2",
           f"tune.scheduler.grace_period={epochs}", "monitor.val_attack.steps=2", "monitor.probe_steps=30",
           "method.train.batch_size=256", "tune.verbose=0", "analyze=false"]
    sweep = Path(json.loads(subprocess.run(cmd + ["--cfg"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                           check=True).stdout)["sweep_dir"])
    trials = lambda: sorted(sweep.glob("trial_*"))  # noqa: E731
    first = Proc(cmd, tmp_path / "first.log")
    first.wait_until(lambda: len(trials()) == 2 and all(_epochs(t / "result.json") for t in trials()))
    os.killpg(first.proc.pid, signal.SIGINT)
    t0 = time.time()
    rc, log = first.finish(), first.log()
    print(f"sweep stopped {time.time() - t0:.0f}s after SIGINT")
    line = re.findall(r"^interrupted sweep \S+ with (\d) unfinished trial\(s\), (\d) of them stopped after their "
                      r"last finished epoch; rerun the same command to resume$", log, re.M)
    assert rc == 130 and len(line) == 1 and "Traceback" not in log, log[-4000:]
    stopped = {}
    for t in trials():
        run = sweep / "train_runs" / f"{sweep.name}-{t.name[len('trial_'):]}"
        seen = _epochs(t / "result.json")
        if seen[-1] < epochs:  # stopped between steps: Tune has exactly the registered epochs
            assert seen == list(range(1, seen[-1] + 1)) and max(_registered(run)) == seen[-1], (seen, log[-3000:])
            stopped[t.name] = seen[-1]
    assert int(line[0][1]) == len(stopped) >= 1, log[-4000:]
    lost = min(trials(), key=lambda t: t.name)  # as if Tune had recorded none of its epochs
    (lost / "result.json").unlink()

    second = Proc(cmd, tmp_path / "second.log")
    rc, out = second.finish(timeout=600), second.log()
    assert rc == 0, out[-4000:]
    for name, epoch in stopped.items():
        assert re.search(rf"\[student\] resumed after epoch {epoch} ", out), (name, out[-4000:])
    for t in trials():  # Tune's records list each epoch once (tune/records.py, replay_point)
        assert _epochs(t / "result.json") == list(range(1, epochs + 1)), (t.name, out[-4000:])
        with open(t / "progress.csv") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, epochs + 1)), t.name
        run = sweep / "train_runs" / f"{sweep.name}-{t.name[len('trial_'):]}"
        assert len(_checkpoint_folders(run)) <= 2  # cluster.checkpoints_to_keep


def _run_overrides(tmp_path: Path, epochs: int, **extra: str) -> list[str]:
    return tiny_overrides(tmp_path, **{
        "method": "simclr", "recipe": "pretrain", "data.resolution": "16", "data.val_fraction": "0.75",
        "method.train.batch_size": "64", "method.train.optimizer": "sgd", "method.train.lr": "0.1",
        "method.train.epochs": str(epochs), "cluster.cpus_per_worker": "1", "eval.protocols": "[]",
        # sleeps while each checkpoint is uploaded (no CPU): epochs last long enough to stop one mid-run
        "cluster.debug.slow_checkpoint_write_s": "0.5", **extra})


@pytest.mark.slow
def test_sigterm_stops_every_seed_between_steps_and_the_rerun_resumes(tmp_path):
    from conf import compose
    from trainer.launch import trainer_path
    from trainer.seeds import seed_config

    epochs = 6
    overrides = _run_overrides(tmp_path, epochs, seeds="[0,1]")
    cmd = [sys.executable, "-m", "trainer.run", *overrides]
    cfg = compose(overrides)
    runs = {s: Path(trainer_path(c, f"{c['run_name']}-train")) for s in (0, 1) for c in [seed_config(cfg, s)]}
    first = Proc(cmd, tmp_path / "first.log")
    first.wait_until(lambda: all(_registered(r) for r in runs.values()))
    os.kill(first.proc.pid, signal.SIGTERM)  # to the driver only, as a scheduler sends it
    rc, log = first.finish(), first.log()
    line = re.findall(r"^interrupted with (\d) of 2 run\(s\) unfinished, (\d) of them stopped after their last "
                      r"finished epoch; rerun the same command to resume$", log, re.M)
    assert rc == 143 and len(line) == 1 and "Traceback" not in log, log[-4000:]
    done = {s: max(_registered(r)) for s, r in runs.items()}
    stopped = {s: e for s, e in done.items() if e < epochs}
    assert int(line[0][1]) == len(stopped) >= 1, (done, log[-4000:])
    for s in stopped:  # the worker's own line: it stopped after a step, its last epoch registered
        assert f"[train] stop requested: stopping after epoch {done[s]}" in log, log[-4000:]

    second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    for s, e in stopped.items():
        assert re.search(rf"\[train\] resumed after epoch {e} ", out), (s, out[-4000:])
    for r in runs.values():
        assert max(_registered(r)) == epochs and len(_checkpoint_folders(r)) <= 2


def _job_logs(head: dict, job_id: str) -> str:
    out = subprocess.run([RAY, "job", "logs", "--address", head["address"], job_id], env=head["env"],
                         capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


@pytest.mark.slow
def test_ray_job_stop_stops_at_a_step_and_the_resubmitted_job_resumes(ray_head, tmp_path):
    from conf import compose

    shared = tmp_path / "shared"  # stands in for NFS: output_dir, storage_path, betons
    epochs = 6
    overrides = _run_overrides(shared, epochs, **{"cluster.num_workers": "1", "cluster.use_gpu": "false",
                                                  "cluster.storage_path": str(shared / "ray_results")})
    cfg = compose(["cluster=ray", *overrides])
    run = shared / "ray_results" / f"{cfg['run_name']}-train"
    submit = [RAY, "job", "submit", "--address", ray_head["address"], "--runtime-env", "cluster/runtime_env.yaml"]
    entry = ["--", "python", "-m", "trainer.run", "cluster=ray", *overrides]
    job_id = f"stop-{os.getpid()}-{int(time.time())}"
    started = subprocess.run(submit + ["--no-wait", "--submission-id", job_id, *entry], cwd=ROOT,
                             env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    t0 = time.time()
    while not _registered(run):
        assert time.time() - t0 < 400, _job_logs(ray_head, job_id)[-4000:]
        time.sleep(0.5)
    stop = subprocess.run([RAY, "job", "stop", "--address", ray_head["address"], job_id], env=ray_head["env"],
                          capture_output=True, text=True, timeout=180)
    logs = _job_logs(ray_head, job_id)
    assert stop.returncode == 0, stop.stdout + stop.stderr + logs[-3000:]
    line = re.findall(r"^interrupted after train epoch (\d+); rerun the same command to resume$", logs, re.M)
    assert len(line) == 1 and "[run] SIGTERM: stopping after the current training step" in logs, logs[-4000:]
    done = int(line[0])
    assert max(_registered(run)) == done >= 1 and "Traceback" not in logs, logs[-4000:]

    again = subprocess.run(submit + entry, cwd=ROOT, env=ray_head["env"], capture_output=True, text=True,
                           timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0 and re.search(rf"\[train\] resumed after epoch {done} ", out), out[-4000:]
    assert max(_registered(run)) == epochs and len(_checkpoint_folders(run)) <= 2
