"""A restored trial's Tune records (result.json, progress.csv) continue where they stopped.

Tune writes a trial's records into a staging folder of the driver's Ray session
(`trial.local_path`, under /tmp/ray/session_*) and copies them into the sweep folder. It fetches
the stored records back only for a trial with a *Tune* checkpoint; ours resume from their *Train*
checkpoints and report none to Tune. So a sweep restored by a new process (a rerun of the same
command: a new Ray session, an empty staging folder) started every unfinished trial's records
afresh, and the next copy overwrote the stored history: result.json kept only the epochs after the
restore. `KeepTrialRecords` puts the stored records into the staging folder before Tune's loggers
open them (Tune runs its default loggers after the user's callbacks), so they append.
`tune.search.replay_point` then replays exactly the epochs result.json lacks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

from trainer.storage import copy_file, is_file

RECORDS = ("result.json", "progress.csv")  # result.json first: it decides whether the others come back


class KeepTrialRecords(Callback):
    """Tune callback: on a trial's start, its stored records seed its empty staging folder."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        restore_records(trial.local_path, trial.storage.trial_fs_path, trial.storage.storage_filesystem)


def restore_records(local_dir: str, stored_dir: str, fs: Any) -> list[str]:
    """Copy the stored records (on `fs`, a pyarrow FileSystem: local or remote) into `local_dir`
    where it has none; the names copied. Nothing comes back without a stored result.json: the trial's
    epochs are then all replayed (replay_point 0), and a stale progress.csv would repeat them."""
    copied: list[str] = []
    for name in RECORDS:
        local, stored = Path(local_dir, name), f"{stored_dir.rstrip('/')}/{name}"
        if local.exists():  # the same Ray session restored the sweep: Tune appends to its own copy
            continue
        if not is_file(fs, stored):
            if name == RECORDS[0]:
                return copied
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        copy_file(stored, local, src_fs=fs)
        copied.append(name)
    return copied
