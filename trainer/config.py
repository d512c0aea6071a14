"""Compose the Hydra config and validate it before any Ray resource is claimed.

`compose(overrides)` returns a plain, resolved dict (what Ray workers receive);
`validate(cfg)` raises ConfigError with one line naming the key, the bad value and what is
allowed. Entry points print that line and exit with status 2.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

METHODS = ("simclr", "supcon", "acl", "rocl", "deacl", "supervised")
RECIPES = ("auto", "pretrain", "deacl", "evaluate")
OPTIMIZERS = ("sgd", "lars")
SCHEDULES = ("cosine", "step", "constant")
PROTOCOLS = ("slf", "alf", "aff", "le", "rle")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names key, value and what is allowed."""


def split_cli(argv: list[str] | None, doc: str | None) -> tuple[list[str], bool] | None:
    """Command-line arguments of an entry point: (overrides, whether --cfg was given), or None
    after printing `doc` for -h/--help."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(doc)
        return None
    return [a for a in args if a != "--cfg"], "--cfg" in args


def compose(overrides: list[str] | None = None, config_name: str = "config") -> dict[str, Any]:
    """Compose conf/ with command-line style overrides, resolve it, make paths absolute, validate."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
        plain = OmegaConf.to_container(cfg, resolve=True)
    except MissingConfigException as e:
        # e.g. `method=foo`: name the group, the value and the options that exist.
        group, _, value = str(e.missing_cfg_file).rpartition("/")
        options = ", ".join(sorted(e.options or [])) or "see conf/" + group
        raise ConfigError(f"{group}={value!r} is invalid: no such config; allowed: {options}") from e
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(str(e).split())) from e
    return finalize(plain)


def finalize(cfg: dict[str, Any]) -> dict[str, Any]:
    """Absolute paths (Ray workers chdir), derived run name, then validation."""
    cfg["output_dir"] = str(Path(cfg["output_dir"]).expanduser().absolute())
    data = cfg["data"]
    data["beton_dir"] = str(Path(data["beton_dir"]).expanduser().absolute())
    if data.get("root"):
        data["root"] = str(Path(data["root"]).expanduser().absolute())
    if cfg["cluster"].get("storage_path") in (None, ""):
        cfg["cluster"]["storage_path"] = str(Path(cfg["output_dir"]) / "ray_results")
    elif "://" not in str(cfg["cluster"]["storage_path"]):
        cfg["cluster"]["storage_path"] = str(Path(cfg["cluster"]["storage_path"]).expanduser().absolute())
    if cfg["teacher"].get("checkpoint"):
        cfg["teacher"]["checkpoint"] = str(Path(cfg["teacher"]["checkpoint"]).expanduser().absolute())
    if cfg.get("checkpoint"):
        cfg["checkpoint"] = str(Path(cfg["checkpoint"]).expanduser().absolute())
    if not cfg.get("run_name"):
        cfg["run_name"] = default_run_name(cfg)
    validate(cfg)
    return cfg


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Hash of everything that changes the result (not the cluster shape or output location)."""
    keep = {k: v for k, v in cfg.items() if k not in ("cluster", "run_name", "output_dir", "tune", "log_every_steps")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]


def default_run_name(cfg: Mapping[str, Any]) -> str:
    return f"{cfg['method']['name']}-{cfg['data']['name']}-{config_hash(cfg)}"


def _err(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _positive_int(cfg: Mapping[str, Any], key: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _err(key, value, f"must be an integer >= {minimum}")


def _check_attack(prefix: str, attack: Mapping[str, Any]) -> None:
    eps = attack.get("eps")
    if not isinstance(eps, (int, float)) or eps < 0 or eps > 1:
        raise _err(f"{prefix}.eps", eps, "must be a number in [0, 1] (pixel scale; 8/255 = 0.0314)")
    alpha = attack.get("alpha")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise _err(f"{prefix}.alpha", alpha, "must be a number > 0")
    _positive_int(attack, f"{prefix}.steps", attack.get("steps"))
    if attack.get("norm", "linf") not in ("linf", "l2"):
        raise _err(f"{prefix}.norm", attack.get("norm"), "allowed: linf, l2")
    if not isinstance(attack.get("gather_negatives", True), bool):
        raise _err(f"{prefix}.gather_negatives", attack.get("gather_negatives"), "allowed: true, false")


def _check_train(prefix: str, train: Mapping[str, Any], world_size: int) -> None:
    _positive_int(train, f"{prefix}.epochs", train.get("epochs"))
    bs = train.get("batch_size")
    _positive_int(train, f"{prefix}.batch_size", bs)
    if bs % world_size:
        raise _err(f"{prefix}.batch_size", bs,
                   f"the global batch must be divisible by cluster.num_workers={world_size}")
    if train.get("optimizer") not in OPTIMIZERS:
        raise _err(f"{prefix}.optimizer", train.get("optimizer"), f"allowed: {', '.join(OPTIMIZERS)}")
    if train.get("schedule", "cosine") not in SCHEDULES:
        raise _err(f"{prefix}.schedule", train.get("schedule"), f"allowed: {', '.join(SCHEDULES)}")
    lr = train.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise _err(f"{prefix}.lr", lr, "must be a number > 0")
    if train.get("lr_scaling", "linear") not in ("linear", "none"):
        raise _err(f"{prefix}.lr_scaling", train.get("lr_scaling"), "allowed: linear, none")
    we = train.get("warmup_epochs", 0)
    if not isinstance(we, int) or we < 0 or we > train["epochs"]:
        raise _err(f"{prefix}.warmup_epochs", we, f"must be an integer in [0, epochs={train['epochs']}]")


def _check_method(prefix: str, method: Mapping[str, Any], world_size: int) -> None:
    from trainer.methods import METHOD_REGISTRY

    name = method.get("name")
    if name not in METHOD_REGISTRY:
        raise _err(f"{prefix}.name", name, f"unknown method; allowed: {', '.join(sorted(METHOD_REGISTRY))}")
    _check_train(f"{prefix}.train", method["train"], world_size)
    METHOD_REGISTRY[name].validate_config(method, prefix)


def _check_monitor(cfg: Mapping[str, Any]) -> None:
    """monitor.robust_every (the validation monitor Tune optimises) and tune.objective."""
    mon = cfg.get("monitor") or {}
    every = mon.get("robust_every", 0)
    _positive_int(mon, "monitor.robust_every", every, minimum=0)
    tune = cfg.get("tune") or {}
    if tune.get("objective", "robust") not in ("robust", "clean", "weighted"):
        raise _err("tune.objective", tune.get("objective"), "allowed: robust, clean, weighted")
    w = tune.get("objective_weight", 0.5)
    if not isinstance(w, (int, float)) or not 0 <= w <= 1:
        raise _err("tune.objective_weight", w, "must be a number in [0, 1] (weight of robust accuracy)")
    if every == 0:
        return
    _check_attack("monitor.val_attack", mon.get("val_attack") or {})
    if "val" not in cfg["data"]["splits"] or not cfg["data"].get("val_fraction"):
        raise _err("monitor.robust_every", every, "needs a held-out validation split: set data.val_fraction "
                   "> 0 and add val to data.splits (the test set is never used to select models)")
    _positive_int(mon, "monitor.probe_steps", mon.get("probe_steps", 100))


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first invalid value; checks files that must already exist."""
    cluster = cfg["cluster"]
    _positive_int(cluster, "cluster.num_workers", cluster.get("num_workers"))
    world = cluster["num_workers"]
    _positive_int(cluster, "cluster.cpus_per_worker", cluster.get("cpus_per_worker"))
    if cluster.get("use_gpu") not in (True, False, "auto"):
        raise _err("cluster.use_gpu", cluster.get("use_gpu"), "allowed: true, false, auto")
    if cluster.get("placement_strategy") not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise _err("cluster.placement_strategy", cluster.get("placement_strategy"),
                   "allowed: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
    _positive_int(cluster, "cluster.max_failures", cluster.get("max_failures"), minimum=-1)
    if cfg.get("recipe") not in RECIPES:
        raise _err("recipe", cfg.get("recipe"), f"allowed: {', '.join(RECIPES)}")
    if cfg.get("precision") not in ("auto", "fp32", "bf16"):
        raise _err("precision", cfg.get("precision"), "allowed: auto, fp32, bf16")
    for key, default, words in (("channels_last", "auto", ("auto",)), ("compile", False, COMPILE_MODES),
                                ("freeze_params_in_attack", "auto", ("auto",))):
        v = cfg.get(key, default)
        if not (isinstance(v, bool) or (isinstance(v, str) and v in words)):
            raise _err(key, v, f"allowed: true, false, {', '.join(words)}")
    _check_attack("attack", cfg["attack"])
    _check_attack("eval.pgd", cfg["eval"]["pgd"])
    _check_method("method", cfg["method"], world)
    for p in cfg["eval"]["protocols"]:
        if p not in PROTOCOLS:
            raise _err("eval.protocols", p, f"unknown protocol; allowed: {', '.join(PROTOCOLS)}")
    if cfg["eval"].get("bn_mode") not in ("eval", "train"):
        raise _err("eval.bn_mode", cfg["eval"].get("bn_mode"), "allowed: eval, train")
    if cfg["eval"].get("alf_loss", "trades") not in ("trades", "pgd_at"):
        raise _err("eval.alf_loss", cfg["eval"].get("alf_loss"), "allowed: trades, pgd_at")
    _positive_int(cfg["eval"], "eval.train_attack_steps", cfg["eval"].get("train_attack_steps", 10))
    _positive_int(cfg["eval"]["linear"], "eval.linear.epochs", cfg["eval"]["linear"].get("epochs"))
    lin_bs = cfg["eval"]["linear"].get("batch_size")
    _positive_int(cfg["eval"]["linear"], "eval.linear.batch_size", lin_bs)
    if lin_bs % world:
        raise _err("eval.linear.batch_size", lin_bs, f"must be divisible by cluster.num_workers={world}")
    from data_pipeline.sources import BUNDLED_SOURCES, data_config_problem

    problem = data_config_problem(cfg["data"])
    if problem:
        raise _err(*problem)
    _check_monitor(cfg)
    from trainer.models.resnet import ARCHS

    if cfg["model"].get("arch") not in ARCHS:
        raise _err("model.arch", cfg["model"].get("arch"), f"allowed: {', '.join(ARCHS)}")
    _positive_int(cfg["model"], "model.width", cfg["model"].get("width"))
    if cfg["model"].get("stem_padding") not in (0, 1, 2, 3):
        raise _err("model.stem_padding", cfg["model"].get("stem_padding"), "allowed: 0, 1, 2, 3")
    if cfg["method"]["name"] == "deacl":
        ckpt = cfg["teacher"].get("checkpoint")
        if ckpt and not Path(ckpt).exists():
            raise _err("teacher.checkpoint", ckpt, "file does not exist; give the path of a checkpoint "
                       "this system wrote (model.pt), or null to train the teacher first")
        if cfg["recipe"] == "pretrain" and not ckpt:
            raise _err("teacher.checkpoint", ckpt, "recipe=pretrain with method=deacl needs a teacher "
                       "checkpoint; use recipe=deacl (or auto) to train one first")
        if not ckpt:
            _check_method("teacher.method", cfg["teacher"]["method"], world)
    if cfg.get("recipe") == "evaluate" and not cfg.get("checkpoint"):
        raise _err("checkpoint", cfg.get("checkpoint"), "recipe=evaluate needs +checkpoint=/path/to/model.pt")
    if cfg.get("recipe") == "evaluate":
        ckpt = Path(cfg["checkpoint"])
        if not (ckpt.is_file() or (ckpt / "model.pt").is_file()):
            raise _err("checkpoint", cfg["checkpoint"], "file does not exist; give a model.pt this system "
                       "wrote (or the folder holding one)")
    if cfg["data"].get("name") not in BUNDLED_SOURCES and not cfg["data"].get("download"):
        from data_pipeline.write import beton_path

        missing = [s for s in cfg["data"]["splits"] if not beton_path(cfg["data"], s).exists()]
        root = cfg["data"].get("root")
        if missing and (not root or not Path(root).exists()):
            raise _err("data.root", root, f"no .beton for split(s) {missing} in {cfg['data']['beton_dir']} "
                       "and the dataset root does not exist; set data.root to the dataset folder or "
                       "data.download=true")
