"""Checkpoint integrity on remote storage (cluster.storage_path=s3://...): moto's S3 server over HTTP.

Fast (no Ray): on the S3 file system itself, a truncated, zero-filled or manifest-less checkpoint is
named in one line, moved aside (copied, then deleted: never lost) and the next older one is chosen;
unregistered and half-uploaded folders are pruned; an upload lands whole or leaves only a
`.partial-*` folder. Slow: a tiny Ray Train run on S3 whose newest checkpoint is damaged resumes
from the older one and finishes. Ray's workers are processes of their own: they inherit the
AWS_* variables of this process, which are set before the module's Ray starts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.test_fault_tolerance import _ray_run_dir, _stage, _tiny_cfg, _worker_log, _write_checkpoint, data_dir  # noqa: F401

BUCKET = "robust-ssl-tests"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; AWS_ENDPOINT_URL and dummy credentials point
    pyarrow (and boto3) at it until the module ends."""
    import boto3  # moto's dependency (the dev extras pin moto[s3])
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_dir(s3, request):
    """(S3 file system, a folder of its own in the bucket) for one test."""
    from trainer.storage import storage_fs

    return storage_fs(f"s3://{BUCKET}/{request.node.name}")


def _names(fs, path) -> list[str]:
    from trainer.storage import list_dir

    return [n for n, _ in list_dir(fs, path)]


def _rewrite(fs, path, change) -> None:
    """Replace the object `path` by `change(its bytes)` (what a damaged upload or a bad copy leaves)."""
    from trainer.storage import read_bytes

    data = change(read_bytes(fs, path))
    with fs.open_output_stream(str(path)) as f:
        f.write(data)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _zeros(data: bytes) -> bytes:
    return bytes(len(data))


def _upload_tree(local: Path, fs, dest: str) -> None:
    import pyarrow.fs

    pyarrow.fs.copy_files(str(local), dest, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


# ------------------------------------------------------------------------------------- fast


def test_storage_path_with_a_query_is_refused(tmp_path):
    """Run names and stop markers are appended to the storage path: a `?query` would end up in between."""
    from conf import ConfigError

    with pytest.raises(ConfigError, match=r"^cluster.storage_path='s3://b/x\?region=us-east-1' is invalid: a URI "
                                          r"with a query \(\?\.\.\.\) is not supported"):
        _tiny_cfg(tmp_path, tmp_path / "data", **{"cluster.storage_path": "'s3://b/x?region=us-east-1'"})


def test_s3_manifest_catches_truncated_zero_filled_and_missing_files(tmp_path, s3_dir):
    from trainer.checkpoint import MANIFEST_FILE, copy_checkpoint_files, verify_checkpoint

    fs, root = s3_dir
    ckpt = f"{root}/c"
    copy_checkpoint_files(_write_checkpoint(tmp_path / "c", 3), ckpt, dest_fs=fs)
    assert _names(fs, ckpt) == [MANIFEST_FILE, "model.pt", "state.pt"]
    assert verify_checkpoint(ckpt, fs=fs) is None
    size = fs.get_file_info(f"{ckpt}/state.pt").size
    _rewrite(fs, f"{ckpt}/state.pt", _half)
    assert verify_checkpoint(ckpt, fs=fs) == (f"state.pt: {size // 2} bytes, the manifest says {size} "
                                              "(truncated or partly written)")
    _rewrite(fs, f"{ckpt}/model.pt", _zeros)
    fs.delete_file(f"{ckpt}/state.pt")
    assert verify_checkpoint(ckpt, fs=fs) == "model.pt: sha256 differs from the manifest (overwritten or zero-filled)"
    fs.delete_file(f"{ckpt}/{MANIFEST_FILE}")
    assert verify_checkpoint(ckpt, fs=fs) == "manifest.json: missing"


def test_s3_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, s3_dir):
    """The local fallback test's run folder in S3: same lines, same folders moved aside and pruned."""
    from trainer.checkpoint import MOVED_FILE
    from trainer.storage import exists
    from trainer.worker.resume import PARTIAL_PREFIX, choose_checkpoint

    fs, root = s3_dir
    local, ckpts = _ray_run_dir(tmp_path, epochs=5, registered=4)  # epoch 5: uploaded, never registered
    run = f"{root}/run-train"
    _upload_tree(local, fs, run)
    partial = PARTIAL_PREFIX + "checkpoint_2026-12-02_10-00-06.000000"
    _upload_tree(_write_checkpoint(tmp_path / "partial", 6, manifest=False), fs, f"{run}/{partial}")
    newest, zeroed, bare, intact = (f"{run}/{c.name}" for c in reversed(ckpts[:4]))
    _rewrite(fs, f"{newest}/state.pt", _half)
    _rewrite(fs, f"{zeroed}/model.pt", _zeros)
    fs.delete_file(f"{bare}/manifest.json")  # as a move into place cut short leaves it: never chosen
    lines: list[str] = []
    assert str(choose_checkpoint(newest, run, lines.append, fs)) == intact
    assert len(lines) == 4, lines
    assert lines[0].startswith(f"checkpoint s3://{newest} is damaged (state.pt: ") \
        and lines[0].endswith(f"(truncated or partly written)); moved aside to {ckpts[3].name}.damaged-1")
    assert lines[1] == (f"checkpoint s3://{zeroed} is damaged (model.pt: sha256 differs from the manifest "
                        f"(overwritten or zero-filled)); moved aside to {ckpts[2].name}.damaged-1")
    assert lines[2] == (f"checkpoint s3://{bare} is damaged (manifest.json: missing); moved aside to "
                        f"{ckpts[1].name}.damaged-1; resuming from the older {ckpts[0].name}")
    assert lines[3] == f"removed 2 checkpoint folder(s) Ray never registered (written just before an " \
                       f"interruption; that epoch is redone): {partial}, {ckpts[4].name}"
    for c in ckpts[1:4]:  # kept for inspection; Ray's snapshot still lists the old name: a placeholder
        assert _names(fs, f"{run}/{c.name}.damaged-1") == (["model.pt", "state.pt"] if c is ckpts[1] else
                                                           ["manifest.json", "model.pt", "state.pt"])
        assert _names(fs, f"{run}/{c.name}") == [MOVED_FILE]
    assert not exists(fs, f"{run}/{ckpts[4].name}") and not exists(fs, f"{run}/{partial}")
    lines.clear()  # Ray hands the placeholder out again: nothing is moved twice
    assert str(choose_checkpoint(newest, run, lines.append, fs)) == intact
    assert len(lines) == 3 and all("was damaged and moved aside earlier" in line for line in lines)
    assert sum(n.endswith(".damaged-1") for n in _names(fs, run)) == 3 and not any(
        n.endswith(".damaged-2") for n in _names(fs, run))


def test_s3_upload_lands_whole_or_only_as_a_partial_folder(tmp_path, s3_dir):
    from trainer.checkpoint import MANIFEST_FILE, verify_checkpoint
    from trainer.storage import exists
    from trainer.worker.resume import PARTIAL_PREFIX, prune_unregistered, upload_checkpoint

    fs, root = s3_dir
    src = _write_checkpoint(tmp_path / "local", 2)
    name = "checkpoint_2026-12-02_10-00-02.000000"
    copied: list[int] = []

    def cut_after_two() -> None:  # the upload fails after two files of three
        copied.append(1)
        if len(copied) == 2:
            raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        upload_checkpoint(src, f"{root}/{name}", fs, after_each=cut_after_two)
    assert _names(fs, root) == [PARTIAL_PREFIX + name]  # no checkpoint_* folder appeared
    assert MANIFEST_FILE not in _names(fs, f"{root}/{PARTIAL_PREFIX}{name}")
    lines: list[str] = []
    assert prune_unregistered(root, [], keep=None, say=lines.append, fs=fs) == [PARTIAL_PREFIX + name]
    assert str(upload_checkpoint(src, f"{root}/{name}", fs)) == f"{root}/{name}"
    assert _names(fs, root) == [name] and verify_checkpoint(f"{root}/{name}", fs=fs) is None
    assert not exists(fs, f"{root}/{PARTIAL_PREFIX}{name}")


def test_s3_stage_record_keeps_the_uri_and_recopies_from_it(tmp_path, s3_dir):
    """A finished stage whose Ray run is on S3: stage.json keeps the URI, and a damaged run-folder model
    is recopied from the Ray run's final S3 checkpoint."""
    from trainer.recipes import STAGE_FILE, Stage, copy_checkpoint_dir, finished_stage, reusable_stage, stage_record

    fs, root = s3_dir
    local, ckpts = _ray_run_dir(tmp_path / "ray", epochs=2, registered=2)
    _upload_tree(local, fs, f"{root}/run-train")
    ray_uri = f"s3://{root}/run-train"
    out = tmp_path / "out"
    stage, stage_dir = Stage("train", "pretrain", method={"name": "simclr"}), out / "run" / "train"
    copy_checkpoint_dir(f"{ray_uri}/{ckpts[-1].name}", stage_dir)
    info = {"model_path": str(stage_dir / "model.pt"), "metrics": {"epoch": 2}, "ray_path": ray_uri}
    (stage_dir / STAGE_FILE).write_text(json.dumps(stage_record(info, stage_dir, str(out))))
    assert finished_stage(stage_dir)["ray_path"] == ray_uri
    (stage_dir / "model.pt").write_bytes(bytes((stage_dir / "model.pt").stat().st_size))
    lines: list[str] = []
    assert reusable_stage(stage, stage_dir, lines.append)["metrics"] == {"epoch": 2}
    assert lines == [f"[recipe] stage train: {stage_dir} is damaged (model.pt: sha256 differs from the manifest "
                     f"(overwritten or zero-filled)); moved aside to train.damaged-1 and recopied from the Ray "
                     f"checkpoint {ray_uri}/{ckpts[-1].name}"]
    assert torch.load(stage_dir / "model.pt", weights_only=True)["encoder"]["w"][0] == 2.0


# ------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def ray_on_s3(s3, ray_local):
    """The module's Ray, started after the S3 variables were set (its workers inherit them)."""
    return ray_local


@pytest.mark.slow
def test_damaged_newest_s3_checkpoint_falls_back_to_the_older_one(ray_on_s3, data_dir, tmp_path, capfd):
    """The corrupt-newest-checkpoint test with cluster.storage_path=s3://...: the rerun names the file
    in one line, moves the damaged checkpoint aside in S3, resumes from the older one and finishes."""
    from trainer.checkpoint import STATE_FILE, read_manifest, verify_checkpoint
    from trainer.launch import run_train_stage
    from trainer.recipes import plan, run_stage
    from trainer.storage import storage_fs
    from trainer.worker import pretrain_loop
    from trainer.worker.resume import CHECKPOINT_NAME, registered_checkpoints

    keep = {"method.train.epochs": "4", "cluster.num_workers": "1", "cluster.checkpoints_to_keep": "3",
            "cluster.max_failures": "0", "cluster.storage_path": f"s3://{BUCKET}/slow/ray_results"}
    first = _tiny_cfg(tmp_path, data_dir, **keep, **{"cluster.debug.fail_at_epoch": "3"})
    name = first["run_name"] + "-train"
    with pytest.raises(Exception):  # the worker dies in epoch 3 of 4, no restarts: the stage is unfinished
        run_train_stage(first, _stage(first), pretrain_loop, name)
    fs, run = storage_fs(f"{first['cluster']['storage_path']}/{name}")
    ckpts = registered_checkpoints(run, fs)
    assert [read_manifest(f"{run}/{c}", fs)["epoch"] for c in ckpts] == [1, 2]
    _rewrite(fs, f"{run}/{ckpts[1]}/{STATE_FILE}", _half)

    cfg = _tiny_cfg(tmp_path, data_dir, **keep)
    assert cfg["run_name"] == first["run_name"]
    stage_dir = Path(cfg["output_dir"]) / cfg["run_name"] / "train"
    capfd.readouterr()
    info = run_stage(cfg, plan(cfg)[0], {}, stage_dir, name)
    log = _worker_log(capfd, "[train] resumed after epoch 1")
    damaged = [line for line in log.splitlines() if " is damaged (" in line]
    assert len(damaged) == 1, log[-3000:]
    assert f"checkpoint s3://{run}/{ckpts[1]} is damaged (state.pt: " in damaged[0] and damaged[0].endswith(
        f"(truncated or partly written)); moved aside to {ckpts[1]}.damaged-1; resuming from the older {ckpts[0]}")
    assert "[train] resumed after epoch 1 " in log
    assert info["metrics"]["epoch"] == 4 and info["ray_path"] == f"s3://{run}"
    state = torch.load(stage_dir / STATE_FILE, weights_only=True)
    assert state["epoch"] == 4 and state["resumed_at"] == [1]
    assert verify_checkpoint(stage_dir) is None
    names = _names(fs, run)  # checkpoints_to_keep holds; Ray deleted the placeholder (and epoch 1) itself
    live = [n for n in names if CHECKPOINT_NAME.fullmatch(n)]
    assert live == registered_checkpoints(run, fs) and len(live) == 3
    assert all(verify_checkpoint(f"{run}/{n}", fs=fs) is None for n in live)
    assert f"{ckpts[1]}.damaged-1" in names and STATE_FILE in _names(fs, f"{run}/{ckpts[1]}.damaged-1")
    assert not [n for n in names if n.startswith(".partial-")]
