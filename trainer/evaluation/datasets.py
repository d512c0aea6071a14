"""What the evaluation reads besides the pre-training data: the transfer dataset (eval.data), the
common-corruption files (eval.corruptions) and the black-box surrogate (eval.blackbox).

- `eval_data(cfg)`: the data section the heads train and test on (eval.data, else data).
- `metric_prefix(protocol, cfg)`: `slf` in-domain, `slf_on_<dataset>` under transfer, so a transfer
  number can never be read as an in-domain one.
- `check_eval_inputs(cfg)`: the files are readable and in the right layout, before Ray starts.
- `ensure_eval_betons(cfg)`: the transfer dataset's train / test betons (written like data's).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from conf import ConfigError, invalid
from conf.rules import bundled
from data_pipeline.sources import DataSourceError, corruption_layout
from data_pipeline.write import beton_path, ensure_betons

EVAL_SPLITS = ("train", "test")  # heads train on train, are measured on test


def eval_data(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The dataset of the heads: eval.data (transfer) or the pre-training data."""
    return cfg["eval"]["data"] if cfg["eval"]["data"] is not None else cfg["data"]


def metric_prefix(protocol: str, cfg: Mapping[str, Any]) -> str:
    """`<protocol>` in-domain, `<protocol>_on_<eval dataset>` under transfer (eval.data set)."""
    return protocol if cfg["eval"]["data"] is None else f"{protocol}_on_{cfg['eval']['data']['name']}"


def surrogate_path(cfg: Mapping[str, Any], artifacts: Mapping[str, str]) -> str | None:
    """The black-box surrogate's file: eval.blackbox.surrogate, `teacher` = the run's teacher model."""
    surrogate = cfg["eval"]["blackbox"]["surrogate"]
    if surrogate == "teacher":
        return artifacts.get("teacher")
    return surrogate


def check_eval_inputs(cfg: Mapping[str, Any]) -> None:
    """ConfigError (one line, before Ray) if the transfer dataset, the corruption files or the
    surrogate cannot be used."""
    ed = cfg["eval"]["data"]
    if ed is not None and not bundled(ed) and not ed["download"]:
        missing = [s for s in EVAL_SPLITS if not beton_path(ed, s).exists()]
        if missing and (not ed["root"] or not Path(ed["root"]).exists()):
            raise invalid("eval.data.root", ed["root"], f"no .beton for split(s) {missing} in {ed['beton_dir']} "
                          "and the dataset root does not exist; set eval.data.root to the dataset folder "
                          "or eval.data.download=true")
    cc = cfg["eval"]["corruptions"]
    if cc["root"]:
        try:
            layout = corruption_layout(cc["root"], cc["names"])
        except DataSourceError as e:
            raise invalid("eval.corruptions.root", cc["root"], str(e)) from e
        nc = int(eval_data(cfg)["num_classes"])
        if layout["max_label"] >= nc:
            raise invalid("eval.corruptions.root", cc["root"], f"labels.npy has label {layout['max_label']} but the "
                          f"heads have {nc} classes (CIFAR-100-C needs eval.data or data = cifar100)")
    surrogate = cfg["eval"]["blackbox"]["surrogate"]
    if surrogate and surrogate != "teacher":
        surrogate_kind(surrogate, int(eval_data(cfg)["num_classes"]))


def surrogate_kind(path: str, num_classes: int) -> str:
    """`encoder` (a model.pt: a head is trained on it) or `classifier` (a classifier_<protocol>.pt whose
    head has `num_classes` outputs); ConfigError otherwise."""
    from trainer.checkpoint import load_checked

    blob = load_checked("eval.blackbox.surrogate", path, lambda b: "encoder" in b or "classifier" in b,
                        "model.pt or classifier_<protocol>.pt")
    if "encoder" in blob:
        return "encoder"
    if int(blob.get("num_classes", -1)) != num_classes:
        raise ConfigError(f"eval.blackbox.surrogate={path!r} is invalid: its head has {blob.get('num_classes')} "
                          f"classes, the evaluated heads {num_classes}")
    return "classifier"


def ensure_eval_betons(cfg: Mapping[str, Any], log: Callable[[str], None] = print) -> None:
    """Write (or reuse) the transfer dataset's train and test betons, as data_pipeline.write does for data."""
    if cfg["eval"]["data"] is not None:
        ensure_betons(cfg["eval"]["data"], list(EVAL_SPLITS), log=log)
