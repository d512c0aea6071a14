"""Which checkpoint a restarted stage resumes from, and checkpoint uploads that land whole.

Ray hands a restarted worker its latest registered checkpoint (`ray.train.get_checkpoint()`).
Rank 0 verifies it against its manifest (trainer.checkpoint.verify_checkpoint; a folder written
before manifests existed passes if its files load). A damaged one is reported in one line naming
the file and what is wrong, moved aside to `<name>.damaged-<n>` (never deleted) and the newest older
registered checkpoint that verifies is used; if none does, the stage starts from scratch. At the
moved folder's name an empty placeholder (MOVED_ASIDE.txt) is left while Ray's checkpoint manager
still lists it: Ray refuses a snapshot that names a missing folder, and its `num_to_keep` deletion
raises on one; the placeholder is what it deletes later.

Checkpoint folders Ray never registered (a worker killed between the upload and the controller's
next poll) and half-uploaded `.partial-*` folders are removed on resume: that epoch is redone
anyway, and `checkpoints_to_keep` then holds after any interruption.

Storage may be local (or NFS) or remote (s3://, gs://): everything here goes through Ray's storage
file system (`storage.storage_filesystem`, pyarrow; trainer/storage.py), so a damaged S3 checkpoint is
moved aside (copied, then deleted) and the older one used exactly as on a local disk. Uploads are
atomic (`atomic_upload`): the files are copied under `.partial-<name>`, manifest last, and the folder
is moved into place (locally a rename, fsynced; remotely a copy with the manifest last), so a
`checkpoint_*` folder in storage is complete or has no manifest, and is then never chosen.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import PurePosixPath
from typing import Any, Callable

from trainer.checkpoint import MANIFEST_FILE, MOVED_FILE, copy_checkpoint_files, move_aside, verify_checkpoint
from trainer.storage import (delete_dir, exists, fs_path, is_dir, is_local, list_dir, location, make_dir, move_dir,
                             read_bytes)

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of its registered checkpoints
PARTIAL_PREFIX = ".partial-"
CHECKPOINT_NAME = re.compile(r"checkpoint_[0-9][0-9_.\-]*")  # Ray's checkpoint_<date>_<time>.<us>


def is_checkpoint_dir(path: str | os.PathLike, fs: Any = None) -> bool:
    """A folder named as Ray names checkpoints (moved-aside `.damaged-<n>` ones are not)."""
    return CHECKPOINT_NAME.fullmatch(fs_path(path, fs).name) is not None and is_dir(fs, path)


def registered_checkpoints(run_dir: str | os.PathLike, fs: Any = None) -> list[str] | None:
    """Names of the checkpoints Ray's snapshot in `run_dir` lists ([] without a snapshot; None if it
    cannot be read, in which case nothing is pruned). `fs`: the pyarrow file system (None: local)."""
    snapshot = fs_path(run_dir, fs) / SNAPSHOT_FILE
    try:
        if not exists(fs, snapshot):
            return []
        data = json.loads(read_bytes(fs, snapshot))
        names = [str(r["checkpoint_dir_name"]) for r in data["checkpoint_results"]]
        latest = data.get("latest_checkpoint_result")
        if latest and latest["checkpoint_dir_name"] not in names:
            names.append(str(latest["checkpoint_dir_name"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return names


def choose_checkpoint(given: str | os.PathLike, run_dir: str | os.PathLike, say: Callable[[str], None],
                      fs: Any = None) -> PurePosixPath | None:
    """The folder to resume from: `given` (Ray's latest) if it verifies, else the newest older registered
    checkpoint of `run_dir` that does (None: none does). Damaged ones are moved aside, one line each;
    folders Ray never registered are removed. `fs`: the storage's pyarrow file system (None: local)."""
    given, run_dir = fs_path(given, fs), fs_path(run_dir, fs)
    registered = registered_checkpoints(run_dir, fs)
    # Remote storage moves a folder file by file, so one without its manifest may be a move cut
    # short: never chosen there (one from before manifests existed is moved aside too, kept).
    legacy_ok = is_local(fs)
    if given.parent != run_dir:  # not one of this run's folders: verify it, touch nothing
        problem = verify_checkpoint(given, legacy_ok=legacy_ok, fs=fs)
        if problem:
            say(f"checkpoint {location(fs, given)} is damaged ({problem}); it is not in this run's storage "
                "folder, so it is left in place and the stage starts from scratch")
        return None if problem else given
    names = registered if registered is not None else [
        n for n, folder in list_dir(fs, run_dir) if folder and CHECKPOINT_NAME.fullmatch(n)]
    candidates = [given] + [run_dir / n for n in sorted(set(names), reverse=True) if n < given.name]
    chosen, lines = None, []
    for path in candidates:
        problem = verify_checkpoint(path, legacy_ok=legacy_ok, fs=fs)
        if problem is None:
            chosen = path
            break
        lines.append(_set_aside(path, problem, registered, fs))
    if lines:
        lines[-1] += (f"; resuming from the older {chosen.name}" if chosen is not None
                      else "; no intact checkpoint is left: the stage starts from scratch")
    for line in lines:
        say(line)
    prune_unregistered(run_dir, registered, keep=chosen, say=say, fs=fs)
    return chosen


def _set_aside(path: PurePosixPath, problem: str, registered: list[str] | None, fs: Any) -> str:
    if exists(fs, path / MOVED_FILE):  # a placeholder from an earlier resume
        earlier = read_bytes(fs, path / MOVED_FILE).decode().strip()
        return f"checkpoint {location(fs, path)} was damaged and moved aside earlier ({earlier})"
    listed = registered is None or path.name in registered  # Ray still lists it: leave a placeholder
    dest = move_aside(path, problem, placeholder=listed, fs=fs)
    return f"checkpoint {location(fs, path)} is damaged ({problem}); moved aside to {dest.name}"


def prune_unregistered(run_dir: str | os.PathLike, registered: list[str] | None, keep: PurePosixPath | None,
                       say: Callable[[str], None], fs: Any = None) -> list[str]:
    """Remove `checkpoint_*` folders Ray's snapshot does not list and `.partial-*` uploads; their names."""
    run_dir = fs_path(run_dir, fs)
    if registered is None:
        return []
    gone = []
    for name, folder in list_dir(fs, run_dir):
        stray = CHECKPOINT_NAME.fullmatch(name) is not None and name not in registered
        if folder and (stray or name.startswith(PARTIAL_PREFIX)) and run_dir / name != keep:
            try:
                delete_dir(fs, run_dir / name)
            except OSError:  # removed meanwhile, or not ours to remove: it is only clutter
                continue
            gone.append(name)
    if gone:
        say(f"removed {len(gone)} checkpoint folder(s) Ray never registered (written just before an "
            f"interruption; that epoch is redone): {', '.join(gone)}")
    return gone


def atomic_upload(delay_s: float = 0.0) -> Callable[[Any, str], Any]:
    """A `checkpoint_upload_fn` for `ray.train.report`, for any storage: copy the files under
    `.partial-<name>` (the manifest last), then move the folder to `<name>` (locally one rename; in
    an object store a copy with the manifest last, so a `<name>` without it never verifies).
    `delay_s` (cluster.debug.slow_checkpoint_write_s) sleeps after each file: fault tests widen the
    write window."""
    import ray.train

    def upload(checkpoint: Any, dir_name: str) -> Any:
        storage = ray.train.get_context().get_storage()
        fs = storage.storage_filesystem
        final = upload_checkpoint(checkpoint.path, storage.build_checkpoint_path_from_name(dir_name), fs,
                                  checkpoint.filesystem, (lambda: time.sleep(delay_s)) if delay_s else None)
        return ray.train.Checkpoint(path=str(final), filesystem=fs)

    return upload


def upload_checkpoint(src: str | os.PathLike, final: str | os.PathLike, fs: Any, src_fs: Any = None,
                      after_each: Callable[[], None] | None = None) -> PurePosixPath:
    """Copy the checkpoint folder `src` to `final` on `fs` whole (what `atomic_upload` does); `final`."""
    final = fs_path(final, fs)
    partial = final.with_name(PARTIAL_PREFIX + final.name)
    delete_dir(fs, partial)
    make_dir(fs, partial)
    copy_checkpoint_files(src, partial, after_each, src_fs=src_fs, dest_fs=fs)
    move_dir(fs, partial, final, last=MANIFEST_FILE)
    return final


def resume_checkpoint(ctx: Any, say: Callable[[str], None]) -> Any | None:
    """The checkpoint every rank resumes from (a `ray.train.Checkpoint`, or None: from scratch).
    Rank 0 chooses (verifying, moving aside, pruning: one writer) and tells the other ranks."""
    import ray.train

    given = ray.train.get_checkpoint()
    chosen: str | None = None
    if ctx.is_main:
        chosen = _choose_on_rank0(given, say)
    if ctx.distributed:
        import torch.distributed

        box = [chosen]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen = box[0]
    if chosen is None:
        return None
    return given if chosen == given.path else ray.train.Checkpoint(path=chosen, filesystem=given.filesystem)


def _choose_on_rank0(given: Any | None, say: Callable[[str], None]) -> str | None:
    """choose_checkpoint in this run's storage folder, local or remote (Ray's storage file system)."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs, run_dir = storage.storage_filesystem, storage.experiment_fs_path
    if given is None:
        prune_unregistered(run_dir, registered_checkpoints(run_dir, fs), keep=None, say=say, fs=fs)
        return None
    chosen = choose_checkpoint(given.path, run_dir, say, fs)
    return None if chosen is None else str(chosen)
