"""Checkpoints, resume and failure handling.

Fast: RNG streams survive torch.save -> torch.load(weights_only=True); run folders refuse a
different config. Slow (Ray Train on a local Ray): a worker killed mid-epoch restarts from the
last checkpoint (at most one epoch lost); a non-finite loss stops the run without retries and
keeps the last good checkpoint. (A stopped job resubmitted with the same command resumes, bit for
bit: tests/test_signals.py, whose Ctrl-C test makes that run anyway.) A finished run's rerun
needs no Ray, a copy of its outputs folder reuses its own files and a damaged run-folder model.pt
is recopied, not reused (issue 17's problems 6 and 7 end to end).
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RAY_DEFAULT_TRAIN_POLL_S, ROOT, TRAIN_POLL_ENV, start_local_ray, tiny_overrides


# ------------------------------------------------------------------------------------- fast


def test_rng_state_round_trip_with_weights_only():
    from trainer.checkpoint import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(5)
    np.random.rand(3)
    np.random.standard_normal()  # leaves a cached Gaussian in the legacy numpy state
    random.gauss(0, 1)  # and one in Python's
    torch.rand(2, generator=gen)
    buf = io.BytesIO()
    torch.save({"rng": [rng_state({"loader": gen})]}, buf)

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(),
                torch.rand(1).item(), torch.rand(1, generator=gen).item())

    expected = draw()
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["rng"][0]
    draw(), draw()  # move every stream on
    set_rng_state(loaded, {"loader": gen})
    assert draw() == expected


def _tiny_overrides(tmp_path: Path, data_dir: Path, **extra: str) -> list[str]:
    base = {"method": "simclr", "recipe": "pretrain", "data.beton_dir": str(data_dir), "data.resolution": "16",
            "data.val_fraction": "0.75", "method.train.batch_size": "64", "method.train.optimizer": "sgd",
            "method.train.lr": "0.1", "cluster.cpus_per_worker": "1"}
    base.update(extra)
    return tiny_overrides(tmp_path, **base)


def _tiny_cfg(tmp_path: Path, data_dir: Path, **extra):
    from conf import compose

    return compose(_tiny_overrides(tmp_path, data_dir, **extra))


def test_run_folder_refuses_a_different_config(tmp_path):
    from conf import config_hash
    from trainer.recipes import claim_run_dir, run_dir
    from trainer.worker import RunMismatchError

    a = _tiny_cfg(tmp_path, tmp_path / "data", run_name="shared-name")
    b = _tiny_cfg(tmp_path, tmp_path / "data", run_name="shared-name", **{"method.train.lr": "0.2"})
    out = run_dir(a)
    claim_run_dir(a, out)
    assert json.loads((out / "run.json").read_text())["config_hash"] == config_hash(a)
    claim_run_dir(a, out)  # the same config: resubmission is fine
    c = dict(a, cluster={**a["cluster"], "num_workers": 2})
    claim_run_dir(c, out)  # the cluster shape is not part of the experiment
    with pytest.raises(RunMismatchError, match="config hash"):
        claim_run_dir(b, out)


def _run_name_at(out: Path) -> str:
    from conf import compose

    return compose(["method=simclr", f"output_dir={out}"])["run_name"]  # data.beton_dir: ${output_dir}/data


def test_moved_outputs_folder_keeps_its_run_name(tmp_path):
    """data.beton_dir derives from output_dir: it must not enter the run's identity."""
    assert _run_name_at(tmp_path / "a") == _run_name_at(tmp_path / "elsewhere" / "b")


def test_run_made_under_the_legacy_hash_keeps_its_name_and_checkpoints(tmp_path):
    from conf import compose, config_hash, legacy_config_hash
    from trainer.recipes import claim_run_dir, identity_hash, run_dir

    out = tmp_path / "out"
    cfg = compose(["method=simclr", f"output_dir={out}"])
    assert legacy_config_hash(cfg) != config_hash(cfg)
    legacy_name = cfg["run_name"].rsplit("-", 1)[0] + "-" + legacy_config_hash(cfg)
    (out / legacy_name).mkdir(parents=True)
    (out / legacy_name / "run.json").write_text(json.dumps({"config_hash": legacy_config_hash(cfg)}))
    old = compose(["method=simclr", f"output_dir={out}"])
    assert old["run_name"] == legacy_name
    claim_run_dir(old, run_dir(old))  # its run.json is accepted
    assert identity_hash(old) == legacy_config_hash(cfg)  # its checkpoints' identity still matches
    assert identity_hash(cfg) == config_hash(cfg)


def test_stage_record_survives_a_moved_outputs_folder(tmp_path):
    import shutil

    from trainer.recipes import STAGE_FILE, finished_stage, stage_record

    out = tmp_path / "out"
    stage_dir = out / "run" / "student"
    stage_dir.mkdir(parents=True)
    (stage_dir / "model.pt").write_bytes(b"weights")
    info = {"model_path": str(stage_dir / "model.pt"), "ray_path": str(out / "ray_results" / "run-student"),
            "evaluated": str(out / "run" / "teacher" / "model.pt"), "metrics": {}}
    record = stage_record(info, stage_dir, str(out))
    assert not any(Path(record[k]).is_absolute() for k in ("model_path", "ray_path", "evaluated"))
    (stage_dir / STAGE_FILE).write_text(json.dumps(record))
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    got = finished_stage(moved / "run" / "student")
    assert got["model_path"] == str(moved / "run" / "student" / "model.pt")
    assert got["ray_path"] == str(moved / "ray_results" / "run-student")
    assert got["evaluated"] == str(moved / "run" / "teacher" / "model.pt")
    legacy = moved / "run" / "student" / STAGE_FILE  # an old record: absolute paths into the old place
    legacy.write_text(json.dumps(info))
    assert finished_stage(moved / "run" / "student")["model_path"] == str(moved / "run" / "student" / "model.pt")


def test_checkpoint_identity_mismatch_message(tmp_path):
    from trainer.worker.state import identity_mismatch

    a = _tiny_cfg(tmp_path, tmp_path / "data")
    b = _tiny_cfg(tmp_path, tmp_path / "data", **{"method.train.lr": "0.2"})
    ident = _stage(a)["identity"]
    assert identity_mismatch(ident, _stage(a)["identity"]) is None
    msg = identity_mismatch(ident, _stage(b)["identity"])
    assert "config_hash" in msg and "another configuration" in msg


def test_debug_keys_are_validated(tmp_path):
    from conf import ConfigError

    with pytest.raises(ConfigError, match="^cluster.debug.fail_at_epoch=0 is invalid"):
        _tiny_cfg(tmp_path, tmp_path / "data", **{"cluster.debug.fail_at_epoch": "0"})


# ------------------------------------------------ checkpoint integrity (fast, no Ray)


def _write_checkpoint(directory: Path, epoch: int, manifest: bool = True) -> Path:
    """A checkpoint folder as TrainState.save writes one: model.pt, state.pt, then manifest.json."""
    from trainer.checkpoint import MODEL_FILE, STATE_FILE, atomic_save, write_manifest

    directory.mkdir(parents=True)
    atomic_save({"encoder": {"w": torch.full((64,), float(epoch))}}, directory / MODEL_FILE)
    atomic_save({"epoch": epoch, "optimizer": {"m": torch.arange(256.0) * epoch}}, directory / STATE_FILE)
    if manifest:
        write_manifest(directory, epoch=epoch, config_hash="abc")
    return directory


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_fill(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def test_manifest_catches_truncated_zero_filled_and_missing_files(tmp_path):
    from trainer.checkpoint import MANIFEST_FILE, verify_checkpoint

    ckpt = _write_checkpoint(tmp_path / "c", 3)
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    assert manifest["epoch"] == 3 and manifest["config_hash"] == "abc"
    assert set(manifest["files"]) == {"model.pt", "state.pt"}
    assert verify_checkpoint(ckpt) is None
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temporaries left behind
    size = (ckpt / "state.pt").stat().st_size
    _truncate(ckpt / "state.pt")
    assert verify_checkpoint(ckpt) == (f"state.pt: {size // 2} bytes, the manifest says {size} "
                                       "(truncated or partly written)")
    _zero_fill(ckpt / "model.pt")  # same size: only the hash can tell
    (ckpt / "state.pt").unlink()
    assert verify_checkpoint(ckpt) == "model.pt: sha256 differs from the manifest (overwritten or zero-filled)"
    (ckpt / "model.pt").unlink()
    assert verify_checkpoint(ckpt) == "model.pt: missing"
    (ckpt / MANIFEST_FILE).write_text('{"files": ')
    assert verify_checkpoint(ckpt) == "manifest.json: unreadable (JSONDecodeError)"
    (ckpt / MANIFEST_FILE).unlink()
    assert verify_checkpoint(ckpt) == "manifest.json: missing"


def test_checkpoint_without_manifest_is_accepted_if_it_loads(tmp_path):
    from trainer.checkpoint import verify_checkpoint

    legacy = _write_checkpoint(tmp_path / "old", 2, manifest=False)
    assert verify_checkpoint(legacy, legacy_ok=True) is None
    _zero_fill(legacy / "state.pt")
    assert verify_checkpoint(legacy, legacy_ok=True).startswith("state.pt: cannot be loaded (")


def test_damaged_folders_are_renamed_never_deleted(tmp_path):
    from trainer.checkpoint import MOVED_FILE, damaged_name, move_aside, verify_checkpoint

    ckpt = _write_checkpoint(tmp_path / "checkpoint_1", 1)
    assert damaged_name(ckpt) == tmp_path / "checkpoint_1.damaged-1"
    (tmp_path / "checkpoint_1.damaged-1").mkdir()
    assert move_aside(ckpt, "state.pt: missing") == tmp_path / "checkpoint_1.damaged-2"
    assert not ckpt.exists() and (tmp_path / "checkpoint_1.damaged-2" / "state.pt").exists()
    again = _write_checkpoint(tmp_path / "checkpoint_1", 1)
    dest = move_aside(again, "model.pt: missing", placeholder=True)
    assert dest.name == "checkpoint_1.damaged-3" and (dest / "model.pt").exists()
    assert sorted(p.name for p in again.iterdir()) == [MOVED_FILE]  # for Ray's bookkeeping
    assert verify_checkpoint(again, legacy_ok=True) == ("MOVED_ASIDE.txt: moved aside earlier "
                                                        "(to checkpoint_1.damaged-3: model.pt: missing)")


def test_local_checkpoint_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    """A worker killed while writing its local checkpoint folder leaves it behind; the next one cleans up."""
    import tempfile

    from trainer.worker.context import CHECKPOINT_DIR_PREFIX, STALE_CHECKPOINT_DIR_S, new_checkpoint_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = time.time() - STALE_CHECKPOINT_DIR_S - 60
    left = {}
    for what, pid, mtime in (("dead_old", dead.stdout.strip(), old), ("dead_new", dead.stdout.strip(), None),
                             ("alive_old", str(os.getpid()), old)):
        left[what] = tmp_path / f"{CHECKPOINT_DIR_PREFIX}{pid}-{what}"
        left[what].mkdir()
        if mtime:
            os.utime(left[what], (mtime, mtime))
    fresh = Path(new_checkpoint_dir())
    assert fresh.parent == tmp_path and fresh.name.startswith(f"{CHECKPOINT_DIR_PREFIX}{os.getpid()}-")
    assert not left["dead_old"].exists() and left["dead_new"].exists() and left["alive_old"].exists()


def _ray_run_dir(root: Path, epochs: int, registered: int) -> tuple[Path, list[Path]]:
    """A Ray Train run folder: `epochs` checkpoints, the last `registered` of them in Ray's snapshot."""
    from trainer.worker.resume import SNAPSHOT_FILE

    run = root / "ray_results" / "run-train"
    ckpts = [_write_checkpoint(run / f"checkpoint_2026-12-02_10-00-0{e}.000000", e) for e in range(1, epochs + 1)]
    names = [c.name for c in ckpts[:registered]]
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in names],
                "latest_checkpoint_result": {"checkpoint_dir_name": names[-1], "metrics": {}}}
    (run / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    return run, ckpts


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    from trainer.checkpoint import MOVED_FILE
    from trainer.worker.resume import PARTIAL_PREFIX, choose_checkpoint

    run, ckpts = _ray_run_dir(tmp_path, epochs=4, registered=3)  # epoch 4: uploaded, never registered
    (run / (PARTIAL_PREFIX + "checkpoint_2026-12-02_10-00-05.000000")).mkdir()  # a half-done upload
    _truncate(ckpts[2] / "state.pt")
    lines: list[str] = []
    assert choose_checkpoint(ckpts[2], run, lines.append) == ckpts[1]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"checkpoint {ckpts[2]} is damaged (state.pt: ") \
        and lines[0].endswith(f"moved aside to {ckpts[2].name}.damaged-1; resuming from the older {ckpts[1].name}")
    assert lines[1].startswith("removed 2 checkpoint folder(s) Ray never registered")
    assert (run / f"{ckpts[2].name}.damaged-1" / "state.pt").exists()  # kept for inspection
    assert sorted(p.name for p in ckpts[2].iterdir()) == [MOVED_FILE]  # Ray's snapshot still lists it
    assert not ckpts[3].exists() and not any(p.name.startswith(PARTIAL_PREFIX) for p in run.iterdir())
    # Ray hands the placeholder out again if the worker dies before the next registration.
    lines.clear()
    assert choose_checkpoint(ckpts[2], run, lines.append) == ckpts[1]
    assert len(lines) == 1 and lines[0].startswith(
        f"checkpoint {ckpts[2]} was damaged and moved aside earlier (to {ckpts[2].name}.damaged-1: state.pt: ")
    assert lines[0].endswith(f"; resuming from the older {ckpts[1].name}")
    assert len(list(run.glob("*.damaged-*"))) == 1  # not moved twice
    # Nothing intact left: the stage starts from scratch, saying so.
    _zero_fill(ckpts[1] / "model.pt")
    _truncate(ckpts[0] / "model.pt")
    lines.clear()
    assert choose_checkpoint(ckpts[2], run, lines.append) is None
    assert len(lines) == 3 and "model.pt: sha256 differs" in lines[1] and "model.pt: " in lines[2]
    assert lines[-1].endswith("no intact checkpoint is left: the stage starts from scratch")
    assert len(list(run.glob("*.damaged-*"))) == 3


def test_damaged_run_folder_is_moved_aside_and_recopied_or_rerun(tmp_path):
    """Problem 7: a finished stage is reused only if its run-folder files verify."""
    from trainer.checkpoint import verify_checkpoint
    from trainer.recipes import STAGE_FILE, Stage, copy_checkpoint_dir, reusable_stage, stage_record

    out = tmp_path / "out"
    ray_run, ckpts = _ray_run_dir(out, epochs=2, registered=2)
    stage, stage_dir = Stage("train", "pretrain", method={"name": "simclr"}), out / "run" / "train"

    def finish() -> None:
        copy_checkpoint_dir(ckpts[-1], stage_dir)
        info = {"model_path": str(stage_dir / "model.pt"), "metrics": {"epoch": 2}, "ray_path": str(ray_run)}
        (stage_dir / STAGE_FILE).write_text(json.dumps(stage_record(info, stage_dir, str(out))))

    finish()
    lines: list[str] = []
    assert reusable_stage(stage, stage_dir, lines.append)["model_path"] == str(stage_dir / "model.pt")
    assert lines == [] and (stage_dir / "manifest.json").exists()
    _zero_fill(stage_dir / "model.pt")  # the Ray run's final checkpoint is intact: recopied, no Ray
    info = reusable_stage(stage, stage_dir, lines.append)
    assert info["metrics"] == {"epoch": 2} and verify_checkpoint(stage_dir) is None
    assert lines == [f"[recipe] stage train: {stage_dir} is damaged (model.pt: sha256 differs from the manifest "
                     f"(overwritten or zero-filled)); moved aside to train.damaged-1 and recopied from the Ray "
                     f"checkpoint {ckpts[-1]}"]
    assert (out / "run" / "train.damaged-1" / "model.pt").read_bytes() == bytes((stage_dir / "model.pt").stat().st_size)
    _truncate(ckpts[-1] / "state.pt")  # now the Ray checkpoint is damaged too: the stage runs again
    _truncate(stage_dir / "state.pt")
    lines.clear()
    assert reusable_stage(stage, stage_dir, lines.append) is None and not stage_dir.exists()
    assert len(lines) == 1 and lines[0].endswith("moved aside to train.damaged-2; the stage runs again")
    finish_dir = out / "run" / "evaluate"  # an unreadable stage.json
    finish_dir.mkdir()
    (finish_dir / STAGE_FILE).write_text("{")
    lines.clear()
    assert reusable_stage(Stage("evaluate", "evaluate"), finish_dir, lines.append) is None
    assert lines == [f"[recipe] stage evaluate: {finish_dir} is damaged (stage.json: unreadable (JSONDecodeError)); "
                     "moved aside to evaluate.damaged-1; the stage runs again"]


# ------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Betons written once for this module (digits at 16x16, a quarter of the train split)."""
    from data_pipeline.write import ensure_betons

    d = tmp_path_factory.mktemp("betons")
    cfg = _tiny_cfg(tmp_path_factory.mktemp("cfg"), d)
    ensure_betons(cfg["data"], list(cfg["data"]["splits"]))
    return d


def _stage(cfg):
    from trainer.recipes import plan, stage_payload

    return stage_payload(cfg, plan(cfg)[0], {})


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_from_last_checkpoint(ray_local, data_dir, tmp_path):
    """A rank killed half-way through epoch 2 restarts the worker group from epoch 1's checkpoint;
    the run ends bit for bit where the uninterrupted run of the same config ends."""
    from tests.test_determinism import assert_same_tensors, metrics, tensors
    from trainer.checkpoint import MODEL_FILE, STATE_FILE, load_encoder
    from trainer.launch import run_train_stage
    from trainer.worker import pretrain_loop

    two_workers = {"method.train.epochs": "3", "cluster.num_workers": "2", "cluster.max_failures": "1"}
    cfg = _tiny_cfg(tmp_path, data_dir, **two_workers, **{"cluster.debug.fail_at_epoch": "2",
                                                         "cluster.debug.fail_rank": "1"})
    name = cfg["run_name"] + "-train"
    result = run_train_stage(cfg, _stage(cfg), pretrain_loop, name)
    run_path = Path(cfg["cluster"]["storage_path"]) / name
    assert (run_path / "fault_injected_epoch2").exists(), "the failure was not injected"
    assert result.metrics["epoch"] == 3
    # The restart resumed after epoch 1: only the interrupted epoch 2 was redone.
    assert result.return_value == {"status": "completed", "epochs": 3, "resumed_at": [1]}
    ckpt = Path(result.checkpoint.path)
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert state["epoch"] == 3 and state["resumed_at"] == [1] and state["world_size"] == 2
    assert len(state["ranks"]) == 2 and state["ranks"][1]["buffers"]["encoder"]
    load_encoder(ckpt / MODEL_FILE)

    plain = _tiny_cfg(tmp_path / "uninterrupted", data_dir, **two_workers)
    reference = run_train_stage(plain, _stage(plain), pretrain_loop, plain["run_name"] + "-train")
    ref_ckpt = Path(reference.checkpoint.path)
    for f in (MODEL_FILE, STATE_FILE):
        assert_same_tensors(tensors(torch.load(ckpt / f, weights_only=True)),
                            tensors(torch.load(ref_ckpt / f, weights_only=True)))
    ref_state = torch.load(ref_ckpt / STATE_FILE, weights_only=True)
    assert metrics(state["history"]) == metrics(ref_state["history"])


@pytest.mark.slow
def test_nonfinite_loss_stops_without_retries_and_keeps_last_good_checkpoint(ray_local, data_dir, tmp_path):
    from trainer.checkpoint import MODEL_FILE, STATE_FILE, load_encoder
    from trainer.launch import run_train_stage
    from trainer.worker import NonFiniteLossError, pretrain_loop

    cfg = _tiny_cfg(tmp_path, data_dir, **{
        "method.train.epochs": "3", "cluster.num_workers": "1", "cluster.max_failures": "3",
        "cluster.debug.nonfinite_at_epoch": "2"})
    t0 = time.time()
    with pytest.raises(NonFiniteLossError, match="non-finite training metrics at epoch 2") as info:
        run_train_stage(cfg, _stage(cfg), pretrain_loop, cfg["run_name"] + "-train")
    result = info.value.result
    assert result.return_value["status"] == "nonfinite"
    assert result.metrics["epoch"] == 1  # nothing was reported for the bad epoch
    ckpt = Path(result.checkpoint.path)
    assert str(ckpt) in str(info.value)
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["resumed_at"] == []  # the first attempt, never retried
    enc = load_encoder(ckpt / MODEL_FILE)
    assert all(torch.isfinite(p).all() for p in enc.state_dict().values() if p.is_floating_point())
    print(f"non-finite run stopped in {time.time() - t0:.0f}s")


def _worker_log(capfd, wanted: str, timeout: float = 20) -> str:
    """What the workers printed so far (Ray forwards their output to this process asynchronously)."""
    log, t0 = "", time.time()
    while True:
        got = capfd.readouterr()
        log += got.out + got.err
        if wanted in log or time.time() - t0 > timeout:
            return log
        time.sleep(0.5)


def _live_checkpoints(run: Path) -> list[Path]:
    from trainer.worker.resume import is_checkpoint_dir

    return sorted(p for p in run.iterdir() if is_checkpoint_dir(p))


@pytest.mark.slow
def test_damaged_newest_checkpoints_fall_back_to_an_older_one(ray_local, data_dir, tmp_path, capfd):
    """Problem 1: the newest checkpoint of an unfinished stage truncated and the one before zero-filled;
    the rerun says so in one line each, moves both aside, resumes from the oldest and finishes. Ray's
    own bookkeeping survives the moved folders (a further crash and restart, num_to_keep deletions)."""
    from trainer.checkpoint import MANIFEST_FILE, MODEL_FILE, STATE_FILE, verify_checkpoint
    from trainer.launch import run_train_stage
    from trainer.recipes import plan, run_stage
    from trainer.worker import pretrain_loop
    from trainer.worker.resume import registered_checkpoints

    keep = {"method.train.epochs": "4", "cluster.num_workers": "1", "cluster.checkpoints_to_keep": "3",
            "cluster.max_failures": "0"}
    first = _tiny_cfg(tmp_path, data_dir, **keep, **{"cluster.debug.fail_at_epoch": "4"})
    name = first["run_name"] + "-train"
    with pytest.raises(Exception):  # the worker dies in epoch 4, no restarts: the stage is unfinished
        run_train_stage(first, _stage(first), pretrain_loop, name)
    run = Path(first["cluster"]["storage_path"]) / name
    ckpts = [run / n for n in registered_checkpoints(run)]
    assert [json.loads((c / MANIFEST_FILE).read_text())["epoch"] for c in ckpts] == [1, 2, 3]
    _truncate(ckpts[2] / STATE_FILE)
    _zero_fill(ckpts[1] / MODEL_FILE)

    # A rerun that crashes again in epoch 2, before it registers anything: Ray's snapshot still lists
    # the two moved folders (placeholders stand in for them).
    second = _tiny_cfg(tmp_path, data_dir, **keep, **{"cluster.debug.fail_at_epoch": "2"})
    assert second["run_name"] == first["run_name"]  # debug keys are not part of the run's identity
    capfd.readouterr()
    with pytest.raises(Exception):
        run_train_stage(second, _stage(second), pretrain_loop, name)
    log = _worker_log(capfd, "[train] resumed after epoch 1")
    damaged = [line for line in log.splitlines() if " is damaged (" in line]
    assert len(damaged) == 2, log[-3000:]
    assert f"checkpoint {ckpts[2]} is damaged (state.pt: " in damaged[0] \
        and damaged[0].endswith(f"(truncated or partly written)); moved aside to {ckpts[2].name}.damaged-1")
    assert damaged[1].endswith(f"checkpoint {ckpts[1]} is damaged (model.pt: sha256 differs from the manifest "
                               f"(overwritten or zero-filled)); moved aside to {ckpts[1].name}.damaged-1; "
                               f"resuming from the older {ckpts[0].name}")
    assert "[train] resumed after epoch 1 " in log

    cfg = _tiny_cfg(tmp_path, data_dir, **keep)
    stage_dir = Path(cfg["output_dir"]) / cfg["run_name"] / "train"
    info = run_stage(cfg, plan(cfg)[0], {}, stage_dir, name)
    log = _worker_log(capfd, "[train] resumed after epoch 1")
    earlier = [line for line in log.splitlines() if "was damaged and moved aside earlier" in line]
    assert len(earlier) == 2 and earlier[-1].endswith(f"resuming from the older {ckpts[0].name}"), log[-3000:]
    assert info["metrics"]["epoch"] == 4
    state = torch.load(stage_dir / STATE_FILE, weights_only=True)
    assert state["epoch"] == 4 and state["resumed_at"] == [1]
    assert verify_checkpoint(stage_dir) is None  # the run folder got the manifest too
    live = _live_checkpoints(run)  # checkpoints_to_keep holds; Ray deleted the placeholders itself
    assert [c.name for c in live] == registered_checkpoints(run) and len(live) == 3
    assert all(verify_checkpoint(c) is None for c in live)
    assert sorted(p.name for p in run.glob("*.damaged-*")) == sorted(f"{c.name}.damaged-1" for c in ckpts[1:])
    assert (run / f"{ckpts[2].name}.damaged-1" / STATE_FILE).stat().st_size < (live[-1] / STATE_FILE).stat().st_size

    # Problem 7: the run folder's model damaged after the stage finished: recopied from Ray's checkpoint.
    _zero_fill(stage_dir / MODEL_FILE)
    lines: list[str] = []
    again = run_stage(cfg, plan(cfg)[0], {}, stage_dir, name, log=lines.append)
    assert again["metrics"]["epoch"] == 4 and verify_checkpoint(stage_dir) is None
    assert lines[0].endswith(f"moved aside to train.damaged-1 and recopied from the Ray checkpoint {live[-1]}")
    assert lines[1].startswith("[recipe] stage train: already complete")


@pytest.mark.slow
def test_finished_run_is_reused_without_ray_from_its_own_folder_and_verified(data_dir, tmp_path):
    """Problems 7 and 6 end to end, on a run finished by `python -m trainer.run`: its rerun gives the
    results without starting Ray (7); a copy of the outputs folder reuses the copy's own files, not the
    original's (6); a zero-filled model.pt in the run folder is noticed and recopied from the Ray
    checkpoint, not reused (7)."""
    import shutil

    import ray

    from conf import compose
    from trainer.checkpoint import MODEL_FILE, load_encoder
    from trainer.recipes import run_recipe

    overrides = _tiny_overrides(tmp_path, data_dir, **{"method.train.epochs": "2", "eval.protocols": "[]"})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.run([sys.executable, "-m", "trainer.run", *overrides], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    cfg = compose(overrides)
    model = Path(cfg["output_dir"]) / cfg["run_name"] / "train" / MODEL_FILE
    ray_was_up = ray.is_initialized()  # the module's ray_local, for the tests after this one
    if ray_was_up:
        ray.shutdown()
    try:
        lines: list[str] = []
        run_recipe(cfg, log=lines.append)
        assert not ray.is_initialized(), "the rerun of a finished run started Ray"
        assert all("already complete" in line for line in lines if line.startswith("[recipe] stage ")), lines

        copy = tmp_path / "copy"
        shutil.copytree(tmp_path / "out", copy / "out")
        copied = compose(_tiny_overrides(copy, data_dir, **{"method.train.epochs": "2", "eval.protocols": "[]"}))
        assert copied["run_name"] == cfg["run_name"]
        lines.clear()
        run_recipe(copied, log=lines.append)
        reused = [line for line in lines if "stage train: already complete, reusing" in line]
        assert reused and reused[0].endswith(str(copy / "out" / cfg["run_name"] / "train" / MODEL_FILE)), lines

        _zero_fill(model)
        lines.clear()
        run_recipe(cfg, log=lines.append)
        assert model.read_bytes() != bytes(model.stat().st_size), f"the zero-filled {model} was reused: {lines}"
        load_encoder(model)
        assert not ray.is_initialized(), "recopying from the Ray checkpoint started Ray"
    finally:
        ray.shutdown()
        if ray_was_up:
            start_local_ray()


class _Killer:
    """SIGKILLs this process's Ray Train worker (`ray::RayTrainWorker`, found among this process's own
    descendants: never another Ray on the machine) `wanted` times, cycling through three moments:
    mid-step (shortly after the attempt's second checkpoint landed: inside the next epoch's steps),
    mid-write (while a `.partial-*` upload is in storage) and right after a report (as soon as a new
    checkpoint folder is in storage, before Ray's controller has registered it). At each kill it
    records the epochs finished so far; at each restart the epoch Ray hands out and whether that
    checkpoint verifies."""

    MOMENTS = ("mid-step", "mid-write", "after-report")

    def __init__(self, run: Path, wanted: int, seed: int) -> None:
        import threading

        self.run, self.wanted, self.rng = run, wanted, random.Random(seed)
        self.kills: list[dict] = []  # per kill: pid, moment, epochs finished, epoch resumed after
        self.corrupt_handed_out = 0
        self.done, self.error = threading.Event(), None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _worker_pid(self) -> int | None:
        import psutil

        dead = {k["pid"] for k in self.kills}
        for p in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()) and p.pid not in dead and p.status() != "zombie":
                    return p.pid
            except psutil.Error:
                continue
        return None

    def _storage(self) -> tuple[list[str], set[str], bool]:
        """(registered checkpoint names, every complete checkpoint folder, an upload in progress)."""
        from trainer.worker.resume import PARTIAL_PREFIX, is_checkpoint_dir, registered_checkpoints

        entries = list(self.run.iterdir()) if self.run.is_dir() else []
        return (registered_checkpoints(self.run) or [], {p.name for p in entries if is_checkpoint_dir(p)},
                any(p.name.startswith(PARTIAL_PREFIX) for p in entries))

    def _epoch(self, name: str) -> int:
        from trainer.checkpoint import MANIFEST_FILE

        return int(json.loads((self.run / name / MANIFEST_FILE).read_text())["epoch"])

    def _wait(self, predicate, timeout: float = 120.0):
        t0 = time.time()
        while not self.done.is_set() and time.time() - t0 < timeout:
            value = predicate()
            if value:
                return value
            time.sleep(0.01)
        raise TimeoutError("the run ended (or stalled) before the next kill")

    def _kill_once(self, moment: str) -> None:
        pid = self._wait(self._worker_pid)
        before = self._storage()[1]
        if moment == "mid-write":
            self._wait(lambda: self._storage()[2])
            time.sleep(self.rng.uniform(0.0, 1.5))
        else:
            new = 2 if moment == "mid-step" else 1
            self._wait(lambda: len(self._storage()[1] - before) >= new)
            time.sleep(self.rng.uniform(0.02, 0.15) if moment == "mid-step" else 0.0)
        _, folders, partial = self._storage()
        finished = max([self._epoch(n) for n in folders] + [0]) + int(partial)  # a partial: its epoch trained
        os.kill(pid, signal.SIGKILL)
        self.kills.append({"pid": pid, "moment": "mid-write" if partial else moment, "finished": finished})

    def _main(self) -> None:
        from trainer.checkpoint import verify_checkpoint

        try:
            for i in range(self.wanted):
                self._kill_once(self.MOMENTS[i % 3])
                self._wait(self._worker_pid)  # the restarted worker: Ray has settled what it hands out
                latest = self.run / self._storage()[0][-1]
                self.corrupt_handed_out += verify_checkpoint(latest) is not None
                self.kills[-1]["resumed"] = self._epoch(latest.name)
        except Exception as e:  # reported by the test
            self.error = e


@pytest.mark.slow
def test_random_sigkills_lose_at_most_one_epoch_each(ray_local, data_dir, tmp_path, capfd, monkeypatch):
    """Problem 4: 10 SIGKILLs of the worker at random moments (mid-step, mid-checkpoint-write, right
    after a report), Ray restarting it each time: the run finishes, each kill discards at most one
    finished epoch (besides the steps of the one in flight), no restart is handed a damaged checkpoint,
    checkpoints_to_keep holds, and the weights are bit for bit the uninterrupted run's."""
    from tests.test_determinism import assert_same_tensors, metrics, tensors
    from trainer.checkpoint import MODEL_FILE, STATE_FILE, verify_checkpoint
    from trainer.launch import run_train_stage
    from trainer.worker import pretrain_loop
    from trainer.worker.resume import registered_checkpoints

    epochs, wanted = 8, 10
    shape = {"method.train.epochs": str(epochs), "cluster.num_workers": "1", "cluster.checkpoints_to_keep": "2"}
    # 3 files x 0.7 s after the local write and as many during the upload: from one checkpoint landing
    # in storage to the next upload starting takes longer than Ray's 2 s poll that registers the first
    # (shorter epochs can lose two: see docs/cluster.md), and the upload is a 2 s window to kill in.
    cfg = _tiny_cfg(tmp_path, data_dir, **shape, **{"cluster.max_failures": "-1",
                                                   "cluster.debug.slow_checkpoint_write_s": "0.7"})
    name = cfg["run_name"] + "-train"
    run = Path(cfg["cluster"]["storage_path"]) / name
    killer = _Killer(run, wanted, seed=17)
    capfd.readouterr()
    t0 = time.time()
    killer.thread.start()
    try:
        with monkeypatch.context() as env:  # Ray's default poll: docs/cluster.md's claim is about that one
            env.setenv(TRAIN_POLL_ENV, RAY_DEFAULT_TRAIN_POLL_S)
            result = run_train_stage(cfg, _stage(cfg), pretrain_loop, name)
    finally:
        killer.done.set()
        killer.thread.join()
    seconds = time.time() - t0
    assert killer.error is None and len(killer.kills) == wanted, (killer.error, killer.kills)
    lost = [k["finished"] - k["resumed"] for k in killer.kills]
    moments = [k["moment"] for k in killer.kills]
    with capfd.disabled():  # the counts docs/cluster.md quotes
        print(f"kill test: {wanted} kills in {seconds:.0f}s; moments {moments}; epochs lost per kill {lost}; "
              f"corrupt resumes {killer.corrupt_handed_out}", flush=True)
    assert result.metrics["epoch"] == epochs
    assert all(0 <= n <= 1 for n in lost), killer.kills
    assert killer.corrupt_handed_out == 0 and set(moments) == set(_Killer.MOMENTS), killer.kills
    log = _worker_log(capfd, "")
    assert " is damaged (" not in log and " moved aside " not in log
    state = torch.load(Path(result.checkpoint.path) / STATE_FILE, weights_only=True)
    assert set(state["resumed_at"]) <= {k["resumed"] for k in killer.kills}  # the resumes that led here
    live = _live_checkpoints(run)
    assert [c.name for c in live] == registered_checkpoints(run) and len(live) == 2
    assert all(verify_checkpoint(c) is None for c in live) and not list(run.glob("*.damaged-*"))
    assert not list(run.glob(".partial-*"))

    plain = _tiny_cfg(tmp_path / "uninterrupted", data_dir, **shape)
    reference = run_train_stage(plain, _stage(plain), pretrain_loop, plain["run_name"] + "-train")
    ckpt, ref = Path(result.checkpoint.path), Path(reference.checkpoint.path)
    for f in (MODEL_FILE, STATE_FILE):
        assert_same_tensors(tensors(torch.load(ckpt / f, weights_only=True)),
                            tensors(torch.load(ref / f, weights_only=True)))
    state, ref_state = (torch.load(p / STATE_FILE, weights_only=True) for p in (ckpt, ref))
    assert metrics(state["history"]) == metrics(ref_state["history"])
