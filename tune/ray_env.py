"""Ray start-up details a sweep needs.

`pin_ray_address` is a `worker_process_setup_hook`: it sets RAY_ADDRESS in every Ray worker process
to the cluster the worker belongs to. Ray Train's PlacementGroupCleaner (which frees the placement
group of a Train run whose controller died, e.g. a trial that ASHA stopped) queries the state API
with an auto-detected address; when several Ray instances run on one host (tests, shared machines)
that detection fails, the group leaks and the next trials wait for CPUs that never come back.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP_HOOK = "tune.ray_env.pin_ray_address"
# Ray Train V2's print patch re-emits every worker print through the logger: each line twice.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def pin_ray_address() -> None:
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def local_runtime_env() -> dict[str, Any]:
    """runtime_env for a Ray started in-process: the repo importable, the address pinned."""
    return {"env_vars": {"PYTHONPATH": str(REPO_ROOT), **WORKER_ENV}, "worker_process_setup_hook": SETUP_HOOK}
