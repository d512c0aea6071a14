"""The rules that span several fields (everything about one field is in conf/schema.py).

`check_rules(cfg)` runs on the schema-validated dict (every key present) and raises ConfigError
naming the key, its value and what is allowed. File checks here need nothing but paths; checks
that need the data pipeline (are the .beton files there?) run in trainer.recipes.preflight.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from conf.errors import ConfigError, invalid
from conf.schema import BUNDLED_DATASETS, DATASET_SPLITS, FIXED_NUM_CLASSES, SYNTHETIC_MAX_CLASSES


def check_rules(cfg: Mapping[str, Any]) -> None:
    world = cfg["cluster"]["num_workers"]
    _check_train("method", cfg["method"], world)
    if _needs_teacher_stage(cfg):
        _check_train("teacher.method", cfg["teacher"]["method"], world)
    lin_bs = cfg["eval"]["linear"]["batch_size"]
    if lin_bs % world:
        raise invalid("eval.linear.batch_size", lin_bs, f"must be divisible by cluster.num_workers={world}")
    _check_data(cfg["data"])
    if cfg["eval"]["data"] is not None:
        _check_data(cfg["eval"]["data"], "eval.data")
    _check_eval_inputs(cfg)
    _check_monitor(cfg)
    _check_autoattack(cfg["eval"]["autoattack"])
    _check_recipe(cfg)
    _check_paths(cfg)
    if cfg["seeds"] is not None and len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise invalid("seeds", cfg["seeds"], "a list of distinct integers in [0, 2^32)")


def _needs_teacher_stage(cfg: Mapping[str, Any]) -> bool:
    return cfg["method"]["name"] == "deacl" and not cfg["teacher"]["checkpoint"]


def _check_train(prefix: str, method: Mapping[str, Any], world: int) -> None:
    train = method["train"]
    if train["batch_size"] % world:
        raise invalid(f"{prefix}.train.batch_size", train["batch_size"],
                      f"the global batch must be divisible by cluster.num_workers={world}")
    if train["warmup_epochs"] > train["epochs"]:
        raise invalid(f"{prefix}.train.warmup_epochs", train["warmup_epochs"],
                      f"must be an integer in [0, epochs={train['epochs']}]")
    if method["name"] == "acl" and sum(method["stream_weights"]) <= 0:
        raise invalid(f"{prefix}.stream_weights", method["stream_weights"],
                      "allowed: [normal, pgd], two numbers >= 0, not both 0")


def _check_data(data: Mapping[str, Any], prefix: str = "data") -> None:
    name, nc = data["name"], data["num_classes"]
    for split in data["splits"]:
        if split not in DATASET_SPLITS[name]:
            raise invalid(f"{prefix}.splits", split, f"{name} splits: {', '.join(DATASET_SPLITS[name])}")
    if "val" in data["splits"] and not data["val_fraction"] and name != "imagefolder":
        raise invalid(f"{prefix}.splits", "val", f"split val needs {prefix}.val_fraction > 0 (held out of train)")
    if name == "digits" and data["resolution"] % 8:
        raise invalid(f"{prefix}.resolution", data["resolution"], "digits needs a multiple of 8")
    if name in FIXED_NUM_CLASSES and nc != FIXED_NUM_CLASSES[name]:
        raise invalid(f"{prefix}.num_classes", nc, f"{name} has {FIXED_NUM_CLASSES[name]} classes")
    if name == "imagefolder" and nc is None:
        raise invalid(f"{prefix}.num_classes", nc, "imagefolder needs the number of class folders (an integer >= 2)")
    if name == "synthetic":
        if nc is None or nc > SYNTHETIC_MAX_CLASSES:
            raise invalid(f"{prefix}.num_classes", nc, f"synthetic needs an integer in [2, {SYNTHETIC_MAX_CLASSES}]")
        for key in ("train_size", "test_size"):
            if data[key] < nc:
                raise invalid(f"data.{key}", data[key], f"must be an integer >= num_classes={nc}")


def _check_monitor(cfg: Mapping[str, Any]) -> None:
    every, data = cfg["monitor"]["robust_every"], cfg["data"]
    if every and ("val" not in data["splits"] or not data["val_fraction"]):
        raise invalid("monitor.robust_every", every, "needs a held-out validation split: set data.val_fraction "
                      "> 0 and add val to data.splits (the test set is never used to select models)")


def _check_autoattack(aa: Mapping[str, Any]) -> None:
    if aa["enabled"] and aa["norm"] != "Linf" and aa["eps"] is None:
        raise ConfigError(f"eval.autoattack.eps=null is invalid with eval.autoattack.norm={aa['norm']}: "
                          "must be a radius > 0 (eval.pgd.eps is an L-inf one), e.g. 0.5")


def _check_eval_inputs(cfg: Mapping[str, Any]) -> None:
    """The corruption folder and the black-box surrogate exist (their contents: trainer.recipes.preflight)."""
    ecfg = cfg["eval"]
    root = ecfg["corruptions"]["root"]
    if root:
        missing = [f"{n}.npy" for n in [*ecfg["corruptions"]["names"], "labels"] if not (Path(root) / f"{n}.npy").is_file()]
        if missing:
            raise invalid("eval.corruptions.root", root, f"must be a folder holding <corruption>.npy and labels.npy "
                          f"(CIFAR-10-C / CIFAR-100-C); missing: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}")
    surrogate = ecfg["blackbox"]["surrogate"]
    has_teacher = cfg["teacher"]["checkpoint"] or (cfg["method"]["name"] == "deacl" and cfg["recipe"] != "evaluate")
    if surrogate == "teacher" and not has_teacher:
        raise invalid("eval.blackbox.surrogate", surrogate, "teacher needs a teacher: method=deacl (its recipe "
                      "trains one) or teacher.checkpoint=...; otherwise give a model.pt or classifier_<protocol>.pt")
    if surrogate and surrogate != "teacher" and not Path(surrogate).is_file():
        raise invalid("eval.blackbox.surrogate", surrogate, "file does not exist; give a model.pt or "
                      "classifier_<protocol>.pt this system wrote (or teacher with recipe=deacl)")


def _check_recipe(cfg: Mapping[str, Any]) -> None:
    recipe, teacher = cfg["recipe"], cfg["teacher"]["checkpoint"]
    if cfg["method"]["name"] == "deacl" and recipe == "pretrain" and not teacher:
        raise invalid("teacher.checkpoint", teacher, "recipe=pretrain with method=deacl needs a teacher "
                      "checkpoint; use recipe=deacl (or auto) to train one first")
    if recipe == "evaluate" and not cfg["checkpoint"]:
        raise invalid("checkpoint", cfg["checkpoint"], "recipe=evaluate needs checkpoint=/path/to/model.pt")


def _check_paths(cfg: Mapping[str, Any]) -> None:
    for key, path in (("cluster.storage_path", cfg["cluster"]["storage_path"]),
                      ("tune.storage_path", cfg["tune"]["storage_path"])):
        if path and "://" in path and "?" in path:  # run names and stop markers are appended to the path
            raise invalid(key, path, "a URI with a query (?...) is not supported; give the options as "
                          "environment variables (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, ...)")
    out = Path(cfg["output_dir"])
    if out.exists() and not out.is_dir():
        raise invalid("output_dir", cfg["output_dir"], "exists and is not a folder; give a folder (it is created)")
    teacher = cfg["teacher"]["checkpoint"]
    if cfg["method"]["name"] == "deacl" and teacher and not Path(teacher).is_file():
        raise invalid("teacher.checkpoint", teacher, "file does not exist; give the path of a checkpoint "
                      "this system wrote (model.pt), or null to train the teacher first")
    ckpt = cfg["checkpoint"]
    if cfg["recipe"] == "evaluate" and not (Path(ckpt).is_file() or (Path(ckpt) / "model.pt").is_file()):
        raise invalid("checkpoint", ckpt, "file does not exist; give a model.pt this system wrote "
                      "(or the folder holding one)")


def bundled(data: Mapping[str, Any]) -> bool:
    """Whether the dataset needs no files on disk."""
    return data["name"] in BUNDLED_DATASETS


__all__ = ["ConfigError", "check_rules", "bundled"]
