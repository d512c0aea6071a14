"""Evaluate any checkpoint this system wrote (SLF / ALF / AFF / LE / rLE; SA, PGD-20, AutoAttack;
transfer, label efficiency, corruptions, black-box: docs/evaluation.md).

    python -m trainer.evaluate checkpoint=outputs/<run>/student/model.pt
    python -m trainer.evaluate checkpoint=... eval.protocols=[slf,alf,aff]
    python -m trainer.evaluate checkpoint=... eval.protocols=[alf] eval.alf_loss=pgd_at eval.bn_mode=train
    python -m trainer.evaluate checkpoint=... eval.protocols=[le,rle]          # RoCL's linear evaluation
    python -m trainer.evaluate checkpoint=... preset=deacl_cifar10 cluster=ray # the papers' budgets
    python -m trainer.evaluate checkpoint=... +data@eval.data=stl10 eval.data.root=/datasets/stl10  # transfer
    python -m trainer.evaluate checkpoint=... eval.corruptions.root=/datasets/CIFAR-10-C      # corruptions
    python -m trainer.evaluate checkpoint=... eval.blackbox.surrogate=<other>/model.pt       # black-box
    python -m trainer.evaluate checkpoint=... eval.label_fraction=0.01                         # 1% labels
    python -m trainer.evaluate checkpoint=... --cfg                            # print the config, exit
    robust-ssl-eval checkpoint=...                                             # installed console script

`checkpoint` is a model.pt (or a folder holding one: a stage folder or a Ray checkpoint folder).
Everything else is a Hydra override of the root config (conf/); the data set is `data=...` (the
checkpoint's own normalisation always comes with it; a mismatch with data.stats is warned about).
This runs the `evaluate` recipe (trainer/recipes.py): one Ray Train run over cluster.num_workers
workers, then prints the table in the papers' layout (SA / RA / AA per protocol) and writes
<output_dir>/<run_name>/results.json, results.csv (one row per protocol), results_paper.csv (the
printed layout) and the trained heads (evaluate_model/classifier_<protocol>.pt). The default run
name is eval-<label>-<hash of the config and of the checkpoint's bytes>: the same command on the
same file reuses the finished evaluation, a changed file gets a new one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from conf import ConfigError, compose, config_hash
from conf.cli import CommandLine, cli_main
from data_pipeline.write import file_sha256
from trainer.checkpoint import MODEL_FILE, load_checked


def checkpoint_file(path: str | Path) -> Path:
    p = Path(path)
    return p / MODEL_FILE if p.is_dir() else p


def checkpoint_label(file: Path, blob: dict[str, Any]) -> str:
    """Row name: the stage that wrote it (teacher, student, train), else its folder's name."""
    meta = blob.get("meta") or {}
    return str(meta.get("stage") or meta.get("method") or file.parent.name or "model")


def prepare(cl: CommandLine) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compose + validate the evaluate config; returns (cfg, info about the checkpoint)."""
    ckpt = cl.own.get("checkpoint")
    for o in cl.overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == "recipe" and value != "evaluate":
            raise ConfigError(f"recipe={value!r} is invalid: trainer.evaluate always runs recipe=evaluate "
                              "(use python -m trainer.run for the others)")
    if not ckpt:
        raise ConfigError("checkpoint=None is invalid: give checkpoint=/path/to/model.pt (a model this system wrote)")
    quoted = f"'{ckpt}'" if "'" not in ckpt else ckpt  # paths with spaces or commas
    cfg = compose(cl.overrides + ["recipe=evaluate", f"checkpoint={quoted}"])
    file = checkpoint_file(cfg["checkpoint"])
    blob = load_checked("checkpoint", ckpt, lambda b: "encoder" in b and "model_cfg" in b, "encoder model.pt")
    sha = file_sha256(file)
    if not cfg["eval"]["label"]:
        cfg["eval"]["label"] = checkpoint_label(file, blob)
    if not any(o.lstrip("+").startswith("run_name=") for o in cl.overrides):
        cfg["run_name"] = f"eval-{cfg['eval']['label']}-{config_hash({**cfg, 'checkpoint_sha256': sha})}"
    info = {"path": str(file), "sha256": sha, "meta": blob.get("meta") or {}, "stats": blob.get("stats"),
            "model_cfg": blob.get("model_cfg"), "dual_bn": bool(blob.get("dual_bn"))}
    return cfg, info


def run(cl: CommandLine) -> int:
    from trainer import signals

    signals.install()  # SIGINT / SIGTERM stop at a safe point (trainer/signals.py)
    cfg, info = prepare(cl)
    if cl.show_cfg:
        print(json.dumps(cfg, indent=2))
        return 0
    if info["stats"] and info["stats"] != cfg["data"]["stats"]:
        print(f"warning: the checkpoint normalises with '{info['stats']}' statistics but the evaluation data is "
              f"'{cfg['data']['name']}' (data.stats={cfg['data']['stats']}); pass data=... to match", file=sys.stderr)
    from trainer.recipes import preflight, run_dir, run_recipe
    from trainer.results import aa_threat_model, format_paper_table, write_results

    preflight(cfg)
    results = run_recipe(cfg)
    results["checkpoint"] = info
    results["eval_settings"] = {k: v for k, v in cfg["eval"].items() if k != "label"}
    write_results(run_dir(cfg), results, cfg)
    print()
    print(format_paper_table(results["table"], list(cfg["eval"]["protocols"]), int(cfg["eval"]["pgd"]["steps"]),
                             aa_threat_model(cfg["eval"])))
    out = results["run_dir"]
    print(f"\nresults: {out}/results.json, {out}/results.csv, {out}/results_paper.csv; "
          f"heads: {out}/evaluate_model/classifier_<protocol>.pt")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(__doc__, argv, run, own_keys=("checkpoint",))


if __name__ == "__main__":
    raise SystemExit(main())
