"""The Ray Train worker loop of an evaluation stage: every protocol of the stage on one checkpoint.

Each protocol (trainer/evaluation/protocols.py) trains its head and measures SA / PGD RA /
AutoAttack (and corruptions, black-box: trainer/evaluation/shift.py); after each, rank 0 reports the results so far with a checkpoint holding every head
trained so far (the stage keeps only its last checkpoint, so it must hold all of them). A head's
file is self-contained (architecture included): trainer.analyze_representations loads it.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

from trainer.checkpoint import atomic_save, load_model_file
from trainer.evaluation.datasets import eval_data
from trainer.evaluation.protocols import run_protocol
from trainer.worker.context import ddp_wrapper, new_checkpoint_dir, setup_worker


def evaluate_loop(config: dict[str, Any]) -> None:
    """Entry of one evaluation stage on every worker. config = {"cfg": ..., "stage": ...}."""
    import ray.train

    cfg, stage = config["cfg"], config["stage"]
    ctx = setup_worker(cfg)
    blob = load_model_file(stage["model_path"])
    arch = {"model_cfg": blob["model_cfg"], "stats": blob["stats"], "num_classes": int(eval_data(cfg)["num_classes"]),
            "label": stage["label"], "encoder_checkpoint": str(stage["model_path"]), "data": eval_data(cfg)["name"]}
    surrogate = stage.get("surrogate")
    if surrogate and os.path.abspath(surrogate) == os.path.abspath(stage["model_path"]):
        if ctx.is_main:  # the surrogate is the evaluated model itself: that would be a white-box attack
            print(f"[{stage['label']}] black-box: the surrogate is this model; skipped", flush=True)
        surrogate = None
    results: dict[str, float] = {}
    heads: dict[str, dict[str, Any]] = {}  # rank 0: every head so far
    for protocol in stage["protocols"]:
        res, model = run_protocol(cfg, ctx, stage["model_path"], protocol, stage["label"],
                                  lambda m: ray.train.report(m), ddp_wrapper(cfg, ctx), surrogate)
        results.update(res)
        directory = None
        if ctx.is_main:
            heads[protocol] = {"classifier": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                               "protocol": protocol, "results": res, **arch}
            directory = new_checkpoint_dir()
            for name, head in heads.items():
                atomic_save(head, os.path.join(directory, f"classifier_{name}.pt"))
        ray.train.report(dict(results),
                         checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
