"""The paper presets: what `--cfg` prints agrees with docs/fidelity.md, and each runs end to end.

The expected values below are the rows of docs/fidelity.md §1-§5 (the reference code's values),
written out by hand: a preset that drifts from its documented recipe fails here. The end-to-end
tests run each whole recipe (every stage and evaluation protocol of the preset) on the digits
betons at a tiny budget: one epoch, width 4, batches of 64, one PGD step.
"""
from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_overrides

EIGHT, FOUR, TWO = 8 / 255, 4 / 255, 2 / 255

DEACL = {
    "data.name": "cifar10", "model.arch": "resnet18", "model.stem_padding": 2,
    "data.augment.interpolation": "bicubic",
    "data.augment.color": {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2,
                           "jitter_p": 0.8, "grayscale_p": 0.2},
    "teacher.method.name": "simclr", "teacher.method.temperature": 0.2, "teacher.method.separate_forwards": True,
    "teacher.method.projector": {"layers": 2, "hidden_dim": 2048, "output_dim": 256, "bn": "none", "bias": "all"},
    "teacher.method.train.epochs": 1000, "teacher.method.train.batch_size": 256,
    "teacher.method.train.optimizer": "lars", "teacher.method.train.lr": 0.4,
    "teacher.method.train.lr_scaling": "linear", "teacher.method.train.weight_decay": 1e-5,
    "teacher.method.train.warmup_epochs": 10,
    "teacher.method.train.lars": {"eta": 0.02, "trust_norm": "sum", "eps": 1e-8, "zero_threshold": 0.0,
                                  "exclude_1d": True, "clip": True, "lr_in_momentum": False},
    "method.name": "deacl", "method.lam": 2.0, "attack.steps": 5, "attack.eps": EIGHT,
    "attack.clamp_start": False,
    "eval.protocols": ["slf", "alf", "aff"], "eval.bn_mode": "train",
    "eval.linear.optimizer": "sgd", "eval.linear.momentum": 0.9, "eval.linear.weight_decay": 2e-4,
    "eval.linear.batch_size": 512, "eval.linear.epochs": 25, "eval.linear.milestones": [15, 20],
    "eval.linear.lr.slf": 0.1, "eval.linear.lr.alf": 0.01, "eval.linear.lr.aff": 0.01,
    "eval.linear.trades_forwards": "three", "eval.linear.trades_beta": 6.0,
    "eval.pgd": {"eps": EIGHT, "alpha": TWO, "steps": 20, "random_start": True, "start": "uniform",
                 "clamp_start": False},
    "eval.autoattack.n_examples": None,
}
ACL = {
    "data.name": "cifar10", "model.arch": "resnet18", "data.stats": "imagenet",
    "data.augment.crop_scale": [0.1, 1.0], "data.augment.interpolation": "bicubic",
    "method.name": "acl", "method.variant": "ds",
    "method.train.optimizer": "lars", "method.train.lr": 5.0, "method.train.batch_size": 512,
    "method.train.epochs": 1000,
    "method.train.lars": {"eta": 0.001, "trust_norm": "sum", "eps": 0.0, "zero_threshold": 1e-15,
                          "exclude_1d": False, "clip": False, "lr_in_momentum": True},
    "method.projector": {"layers": 3, "hidden_dim": "feature", "output_dim": "feature", "bn": "all",
                         "bias": "first"},
    "attack.eps": EIGHT, "attack.steps": 5, "attack.random_start": True, "attack.clamp_start": False,
    "eval.protocols": ["aff"], "eval.linear.epochs": 100, "eval.linear.batch_size": 128,
    "eval.linear.lr.aff": 0.1, "eval.linear.momentum": 0.9, "eval.linear.weight_decay": 2e-4,
    "eval.linear.milestones": [39, 59], "eval.linear.trades_forwards": "two", "eval.linear.head_init": "zero",
    "eval.linear.trades_beta": 6.0, "eval.train_attack_steps": 10,
    "eval.pgd": {"eps": EIGHT, "alpha": TWO, "steps": 20, "random_start": True, "clamp_start": False},
    "eval.autoattack.enabled": False,
}
ROCL = {
    "data.name": "cifar10", "model.arch": "resnet18", "data.stats": "none", "cluster.sync_bn": True,
    "method.name": "rocl", "method.separate_forwards": True, "method.reg_gather_negatives": False,
    "method.attack": {"eps": 0.0314, "alpha": 0.007, "steps": 7, "clamp_start": True, "gather_negatives": False},
    "method.projector": {"layers": 2, "bn": "none", "bias": "all"},
    "model.proj_hidden_dim": 2048, "model.proj_output_dim": 128,
    "method.train.lars": {"eta": 0.001, "trust_norm": "sum", "exclude_1d": False},
    "eval.protocols": ["le", "rle"], "eval.bn_mode": "eval",
    "eval.train_attack_steps": 10, "eval.train_attack_alpha": 0.007,
    "eval.linear": {"epochs": 150, "batch_size": 1024, "weight_decay": 5e-4, "momentum": 0.9,
                    "milestones": [31, 51, 101], "augment": "none"},
    "eval.linear.lr.le": 0.1, "eval.linear.lr.rle": 0.1,
    "eval.pgd": {"eps": 0.0314, "alpha": 0.00314, "steps": 20, "clamp_start": True},
    "eval.autoattack.enabled": False,
}
STUDY_TRIAL = {  # every trial of study_cifar10 (conf/preset/study.yaml)
    "data.name": "cifar10", "data.stats": "none", "model.arch": "resnet50", "data.augment.crop_padding": 5,
    "method.train": {"epochs": 200, "batch_size": 256, "optimizer": "adam", "lr": 3e-4, "lr_scaling": "none",
                     "weight_decay": 0.0, "warmup_epochs": 0, "schedule": "constant"},
    "attack": {"eps": EIGHT, "alpha": 0.01, "random_start": False},
    "method.attack.steps": 5,
    "eval.alf_loss": "ce_clean_adv", "eval.aff_loss": "ce_clean_adv",
    "eval.train_attack_steps": 5, "eval.train_attack_alpha": 0.01, "eval.train_attack_eps": EIGHT,
    "eval.train_attack_mode": "training", "eval.attack_normalized_logits": True,
    "eval.linear": {"epochs": 200, "batch_size": 256, "optimizer": "adam", "weight_decay": 0.0, "milestones": [],
                    "augment": "none"},
    "eval.linear.lr.slf": 3e-4, "eval.linear.lr.alf": 3e-4, "eval.linear.lr.aff": 3e-4,
    "eval.pgd": {"eps": FOUR, "alpha": 0.01, "steps": 40, "random_start": False},
    "eval.autoattack.enabled": False,
}
STUDY_SCHEMES = {  # trial -> its method keys (the schemes of docs/fidelity.md §2 and §5)
    "SL-standard": {"name": "supervised", "loss": "ce", "normalize_logits": True},
    "SL-adversarial": {"name": "supervised", "loss": "ce_clean_adv", "normalize_logits": True,
                       "attack_train_mode": True},
    "CL-adversarial": {"name": "supcon", "use_labels": False, "adversarial": True, "adv_view": "original",
                       "attack_train_mode": True, "separate_forwards": True, "attack": {"alpha": 0.01, "steps": 5,
                                                                                        "random_start": False},
                       "projector": {"layers": 2, "hidden_dim": "feature", "output_dim": 100, "bn": "none",
                                     "bias": "all"}},
    "SCL-adversarial": {"name": "supcon", "use_labels": True, "adversarial": True, "separate_forwards": True},
    "SCL-standard": {"name": "supcon", "use_labels": True, "adversarial": False, "separate_forwards": True},
}
STUDY_SCENARIOS = {"ST": {"pretraining": "standard", "protocol": "slf"},
                   "AT": {"pretraining": "adversarial", "protocol": "slf"},
                   "partial-AT": {"pretraining": "adversarial", "protocol": "alf"},
                   "full-AT": {"pretraining": "adversarial", "protocol": "aff"}}

PRESETS = {"deacl_cifar10": DEACL, "deacl_cifar100": {**DEACL, "data.name": "cifar100", "data.num_classes": 100},
           "acl_ds_cifar10": ACL, "acl_a2a_cifar10": {**ACL, "method.variant": "a2a"},
           "acl_a2s_cifar10": {**ACL, "method.variant": "a2s"}, "rocl_cifar10": ROCL}


def at(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def agrees(actual, expected) -> bool:
    """Expected values (a dict: only its keys) equal the actual ones; floats to 1e-12."""
    if isinstance(expected, dict):
        return all(agrees(actual[k], v) for k, v in expected.items())
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return math.isclose(actual, expected, rel_tol=1e-12)
    return actual == expected and type(actual) is type(expected)


def check_rows(cfg: dict, rows: dict) -> None:
    wrong = {k: (at(cfg, k), v) for k, v in rows.items() if not agrees(at(cfg, k), v)}
    assert not wrong, f"(actual, documented): {wrong}"


def printed_cfg(module, argv: list[str], capsys) -> dict:
    assert module.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_cfg_agrees_with_fidelity_doc(preset, capsys):
    from trainer import run

    check_rows(printed_cfg(run, [f"preset={preset}", "data.root=/datasets/x", "--cfg"], capsys), PRESETS[preset])


def test_agreement_check_sees_a_changed_value(capsys):
    from trainer import run

    cfg = printed_cfg(run, ["preset=acl_ds_cifar10", "data.root=/x", "method.train.lars.zero_threshold=0", "--cfg"],
                      capsys)
    with pytest.raises(AssertionError, match="zero_threshold"):
        check_rows(cfg, ACL)


@pytest.mark.parametrize("study", ["study_cifar10", "study_cifar100"])
def test_study_preset_cfg_agrees_with_fidelity_doc(study, capsys):
    from tune import study as study_module

    plan = printed_cfg(study_module, [f"study={study}", "data.root=/datasets/x", "--cfg"], capsys)
    assert plan["scenarios"] == STUDY_SCENARIOS
    dataset = study.split("_")[1]
    trials = plan["trial_configs"]
    assert set(trials) == {f"{s}-{k}" for s in ("SL", "CL", "SCL") for k in ("standard", "adversarial")}
    for key, cfg in trials.items():
        check_rows(cfg, {**STUDY_TRIAL, "data.name": dataset})
        check_rows(cfg["method"], STUDY_SCHEMES.get(key, {}))
        assert cfg["eval"]["protocols"] == (["slf", "alf", "aff"] if key.endswith("adversarial") else ["slf"])


# ----------------------------------------------------------------------------- end to end, tiny budgets

@pytest.fixture(scope="module")
def shared_betons(tmp_path_factory):
    """One copy of the digits betons (16x16, a quarter of the train split) for every preset."""
    from conf import compose
    from data_pipeline.write import ensure_betons

    d = tmp_path_factory.mktemp("betons")
    cfg = compose(["data=digits", f"data.beton_dir={d}", *TINY_DATA])
    ensure_betons(cfg["data"], list(cfg["data"]["splits"]))
    return d


TINY_DATA = ("data.resolution=16", "data.val_fraction=0.75")
TINY_BUDGET = {"method.train.batch_size": "64", "teacher.method.train.batch_size": "64",
               "eval.linear.batch_size": "64", "attack.steps": "1", "method.attack.steps": "1",
               "eval.train_attack_steps": "1", "cluster.cpus_per_worker": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["deacl_cifar10", "acl_ds_cifar10", "acl_a2a_cifar10", "acl_a2s_cifar10",
                                    "rocl_cifar10"])
def test_preset_runs_end_to_end(preset, shared_betons, tmp_path, ray_local):
    from conf import compose
    from trainer.recipes import preflight, run_recipe

    cfg = compose([f"preset={preset}", "data=digits", *TINY_DATA,
                   *tiny_overrides(tmp_path, **{**TINY_BUDGET, "data.beton_dir": str(shared_betons)})])
    preflight(cfg)
    results = run_recipe(cfg)
    protocols = {p.upper() for p in PRESETS[preset]["eval.protocols"]}
    by_model: dict[str, set[str]] = {}
    for r in results["table"]:
        by_model.setdefault(r["model"], set()).add(r["protocol"])
        assert 0.0 <= r["SA"] <= 100.0 and 0.0 <= r["RA_PGD"] <= 100.0
    assert list(by_model.values()) == [protocols] * (2 if preset.startswith("deacl") else 1), by_model


def test_cifar100_presets_are_their_cifar10_recipes_on_cifar100(capsys):
    """deacl_cifar100 and study_cifar100 differ from their CIFAR-10 presets in the dataset alone, so
    on digits they are the same run (test_preset_runs_end_to_end runs it)."""
    from trainer import run

    a, b = (printed_cfg(run, [f"preset={p}", "data=digits", "--cfg"], capsys) for p in ("deacl_cifar10", "deacl_cifar100"))
    assert a == b
