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

Uploads into a local (or NFS) storage path are atomic (`atomic_upload`): the files are copied under
`.partial-<name>`, fsynced, and the folder is renamed into place, so a `checkpoint_*` folder in
storage is always complete. Other storage (s3://) uses Ray's own upload; the manifest still catches
a partial one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from trainer.checkpoint import MOVED_FILE, copy_checkpoint_files, fsync_dir, move_aside, verify_checkpoint

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of its registered checkpoints
PARTIAL_PREFIX = ".partial-"
CHECKPOINT_NAME = re.compile(r"checkpoint_[0-9][0-9_.\-]*")  # Ray's checkpoint_<date>_<time>.<us>


def is_checkpoint_dir(path: Path) -> bool:
    """A folder named as Ray names checkpoints (moved-aside `.damaged-<n>` ones are not)."""
    return path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name) is not None


def registered_checkpoints(run_dir: Path) -> list[str] | None:
    """Names of the checkpoints Ray's snapshot in `run_dir` lists ([] without a snapshot; None if it
    cannot be read, in which case nothing is pruned)."""
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.exists():
        return []
    try:
        data = json.loads(snapshot.read_text())
        names = [str(r["checkpoint_dir_name"]) for r in data["checkpoint_results"]]
        latest = data.get("latest_checkpoint_result")
        if latest and latest["checkpoint_dir_name"] not in names:
            names.append(str(latest["checkpoint_dir_name"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return names


def choose_checkpoint(given: Path, run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The folder to resume from: `given` (Ray's latest) if it verifies, else the newest older registered
    checkpoint of `run_dir` that does (None: none does). Damaged ones are moved aside, one line each;
    folders Ray never registered are removed."""
    registered = registered_checkpoints(run_dir)
    if given.parent != run_dir:  # not one of this run's folders: verify it, touch nothing
        problem = verify_checkpoint(given, legacy_ok=True)
        if problem:
            say(f"checkpoint {given} is damaged ({problem}); it is not in this run's storage folder, "
                "so it is left in place and the stage starts from scratch")
        return None if problem else given
    names = registered if registered is not None else [p.name for p in run_dir.iterdir() if is_checkpoint_dir(p)]
    candidates = [given] + [run_dir / n for n in sorted(set(names), reverse=True) if n < given.name]
    chosen, lines = None, []
    for path in candidates:
        problem = verify_checkpoint(path, legacy_ok=True)
        if problem is None:
            chosen = path
            break
        lines.append(_set_aside(path, problem, registered))
    if lines:
        lines[-1] += (f"; resuming from the older {chosen.name}" if chosen is not None
                      else "; no intact checkpoint is left: the stage starts from scratch")
    for line in lines:
        say(line)
    prune_unregistered(run_dir, registered, keep=chosen, say=say)
    return chosen


def _set_aside(path: Path, problem: str, registered: list[str] | None) -> str:
    if (path / MOVED_FILE).exists():  # a placeholder from an earlier resume
        return f"checkpoint {path} was damaged and moved aside earlier ({(path / MOVED_FILE).read_text().strip()})"
    listed = registered is None or path.name in registered  # Ray still lists it: leave a placeholder
    dest = move_aside(path, problem, placeholder=listed)
    return f"checkpoint {path} is damaged ({problem}); moved aside to {dest.name}"


def prune_unregistered(run_dir: Path, registered: list[str] | None, keep: Path | None,
                       say: Callable[[str], None]) -> list[str]:
    """Remove `checkpoint_*` folders Ray's snapshot does not list and `.partial-*` uploads; their names."""
    if registered is None or not run_dir.is_dir():
        return []
    gone = []
    for p in sorted(run_dir.iterdir()):
        stray = is_checkpoint_dir(p) and p.name not in registered
        if (stray or (p.is_dir() and p.name.startswith(PARTIAL_PREFIX))) and p != keep:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    if gone:
        say(f"removed {len(gone)} checkpoint folder(s) Ray never registered (written just before an "
            f"interruption; that epoch is redone): {', '.join(gone)}")
    return gone


def atomic_upload(delay_s: float = 0.0) -> Callable[[Any, str], Any]:
    """A `checkpoint_upload_fn` for `ray.train.report` on a local storage path: copy the files under
    `.partial-<name>` (fsynced; the manifest last), then rename the folder to `<name>`. `delay_s`
    (cluster.debug.slow_checkpoint_write_s) sleeps after each file: fault tests widen the write window."""
    import ray.train

    def upload(checkpoint: Any, dir_name: str) -> Any:
        storage = ray.train.get_context().get_storage()
        final = Path(storage.build_checkpoint_path_from_name(dir_name))
        partial = final.with_name(PARTIAL_PREFIX + final.name)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        copy_checkpoint_files(checkpoint.path, partial, (lambda: time.sleep(delay_s)) if delay_s else None)
        os.rename(partial, final)
        fsync_dir(final.parent)
        return ray.train.Checkpoint(path=str(final), filesystem=storage.storage_filesystem)

    return upload


def local_storage_dir() -> Path | None:
    """This run's storage folder when it is on a local (or mounted network) file system, else None."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return None
    return Path(storage.experiment_fs_path)


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
    run_dir = local_storage_dir()
    if run_dir is None:  # remote storage: verify a downloaded copy; nothing is moved there
        if given is None:
            return None
        with given.as_directory() as d:
            problem = verify_checkpoint(d, legacy_ok=True)
        if problem:
            say(f"checkpoint {given.path} is damaged ({problem}); the stage starts from scratch")
            return None
        return given.path
    if given is None:
        prune_unregistered(run_dir, registered_checkpoints(run_dir), keep=None, say=say)
        return None
    chosen = choose_checkpoint(Path(given.path), run_dir, say)
    return None if chosen is None else str(chosen)
