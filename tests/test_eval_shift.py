"""The seeds' evaluations beyond the in-domain white-box table: transfer to a second dataset
(eval.data), common corruptions (CIFAR-10-C layout) and RoCL's black-box transfer attack.

Fast tests read small files in the real on-disk formats, written here (tests/dataset_files.py):
an STL-10 binary (96 px) written to betons at the encoder's 32 px, CIFAR-10-C .npy files. The
slow test runs `python -m trainer.evaluate` with all of them at once under Ray Train.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conf import ConfigError
from conftest import ROOT, composed, tiny_overrides
from data_pipeline.sources import DataSourceError, corruption_layout, corruption_split
from data_pipeline.write import beton_path, read_beton_labels, verify_beton
from dataset_files import register_md5, write_cifar_c, write_stl10
from trainer.attacks import pgd_config
from trainer.distributed import WorkerContext
from trainer.evaluation.datasets import check_eval_inputs, ensure_eval_betons, eval_data, metric_prefix
from trainer.evaluation.robustness import clean_and_pgd_counts
from trainer.evaluation.shift import measure_corruptions
from trainer.results import format_paper_table, results_rows

CPU = WorkerContext(rank=0, world_size=1, device=torch.device("cpu"), num_threads=1)
NAMES = ["gaussian_noise", "fog", "contrast"]


# ----------------------------------------------------------------------------------- transfer

def test_eval_data_config_follows_the_encoder(tmp_path):
    cfg = composed("+data@eval.data=stl10", f"eval.data.root={tmp_path}", "eval.data.val_fraction=0.0",
                   f"data.beton_dir={tmp_path / 'betons'}")
    ed = cfg["eval"]["data"]
    # STL-10's option says 96 px and crop padding 12; the heads see it at the encoder's 32 px (DeACL's Resize(32))
    assert ed["name"] == "stl10" and ed["resolution"] == cfg["data"]["resolution"] == 32
    assert ed["augment"]["crop_padding"] == cfg["data"]["augment"]["crop_padding"] == 4
    assert ed["beton_dir"] == cfg["data"]["beton_dir"]
    assert eval_data(cfg) is ed and metric_prefix("slf", cfg) == "slf_on_stl10"
    assert metric_prefix("slf", composed()) == "slf"  # in-domain keys are unchanged
    # every data key can be set on eval.data, and its values are validated under their own name
    assert composed("+data@eval.data=synthetic", "eval.data.train_size=50")["eval"]["data"]["train_size"] == 50
    with pytest.raises(ConfigError, match=r"eval\.data\.num_classes=7 is invalid.*stl10 has 10 classes"):
        composed("+data@eval.data=stl10", "eval.data.num_classes=7")


def test_stl10_transfer_betons_are_written_at_the_pretraining_resolution(tmp_path, monkeypatch):
    files = write_stl10(tmp_path / "stl10", n_train=12, n_test=6)
    register_md5(monkeypatch, "stl10", tmp_path / "stl10")
    cfg = composed("+data@eval.data=stl10", f"eval.data.root={tmp_path / 'stl10'}",
                   f"data.beton_dir={tmp_path / 'betons'}")
    check_eval_inputs(cfg)  # the root exists: accepted
    ensure_eval_betons(cfg, log=lambda line: None)
    for split, n in (("train", 12), ("test", 6)):
        path = beton_path(cfg["eval"]["data"], split)
        manifest = verify_beton(path)
        assert manifest["count"] == n and manifest["resolution"] == 32
        np.testing.assert_array_equal(read_beton_labels(path), files[split][1])
    # the stored pixels are the 96 px images averaged over 3x3 blocks (area resampling), read back by FFCV
    from data_pipeline.loaders import build_loader

    batch = next(iter(build_loader(str(beton_path(cfg["eval"]["data"], "test")), "eval", 6, "cpu", 1, train=False,
                                   drop_last=False)))
    got = batch["views"][0].permute(0, 2, 3, 1).numpy() * 255
    expected = files["test"][0].astype(np.float64).reshape(6, 32, 3, 32, 3, 3).mean(axis=(2, 4))
    assert np.abs(got - expected).max() <= 1.0


def test_transfer_root_missing_is_one_config_error(tmp_path):
    cfg = composed("+data@eval.data=cifar100", f"eval.data.root={tmp_path / 'nowhere'}",
                   f"data.beton_dir={tmp_path / 'betons'}")
    with pytest.raises(ConfigError, match=r"^eval\.data\.root=.* is invalid: no \.beton"):
        check_eval_inputs(cfg)


def test_results_keep_transfer_and_in_domain_apart():
    m = {"slf_sa": 0.9, "slf_ra": 0.5, "slf_n_test": 100,
         "slf_on_stl10_sa": 0.6, "slf_on_stl10_ra": 0.3, "slf_on_stl10_n_test": 80,
         "slf_on_stl10_c_fog_s1": 0.5, "slf_on_stl10_c_fog": 0.5, "slf_on_stl10_c_mean": 0.5, "slf_on_stl10_c_n": 4,
         "slf_on_stl10_bb_sa": 0.6, "slf_on_stl10_bb_ra": 0.4, "slf_on_stl10_bb_surrogate_ra": 0.1,
         "slf_on_stl10_bb_n": 80}
    rows = results_rows({"student": m}, ["slf"])
    assert [r["protocol"] for r in rows] == ["SLF", "SLF@stl10"]
    assert rows[0]["SA"] == 90 and "C_mean" not in rows[0] and "BB_RA" not in rows[0]
    assert rows[1]["SA"] == 60 and rows[1]["C_fog_s1"] == 50 and rows[1]["BB_RA"] == 40 and rows[1]["BB_n"] == 80
    table = format_paper_table(rows, ["slf"], 20)
    assert "SLF@stl10" in table and "corruptions mean 50.00" in table and "black-box RA 40.00" in table


def test_both_tables_name_autoattacks_threat_model_where_it_is_not_the_pgds():
    from trainer.results import aa_threat_model, format_table

    rows = results_rows({"student": {"slf_sa": 0.9, "slf_ra": 0.5, "slf_aa": 0.4, "slf_aa_n": 32,
                                     "slf_n_test": 100}}, ["slf"])
    same = composed()["eval"]
    l2 = composed("eval.autoattack.norm=L2", "eval.autoattack.eps=0.5")["eval"]
    assert aa_threat_model(same) is None
    assert aa_threat_model(l2) == f"L2, eps 0.5; the PGD: linf, eps {same['pgd']['eps']:.4g}"
    threat = aa_threat_model(l2)
    for table in (format_table(rows, 20, threat), format_paper_table(rows, ["slf"], 20, threat)):
        assert "L2, eps 0.5" in table
    assert "threat model" not in format_table(rows, 20, aa_threat_model(same))


# ----------------------------------------------------------------------------------- corruptions

def test_corruption_files_in_the_published_layout(tmp_path):
    files = write_cifar_c(tmp_path, NAMES, per_severity=4)
    layout = corruption_layout(tmp_path, NAMES)
    assert layout == {"n": 20, "per_severity": 4, "resolution": 32, "max_label": int(files["labels"].max())}
    x, y = corruption_split(tmp_path, "fog", 3, n_examples=2)  # block 3 of 5, its first 2 images
    np.testing.assert_array_equal(x, files["fog"][8:10])
    np.testing.assert_array_equal(y, files["labels"][8:10])
    np.save(tmp_path / "fog.npy", files["fog"][:18])  # no longer 5 blocks like labels.npy
    with pytest.raises(DataSourceError, match=r"fog\.npy is uint8 \[18, 32, 32, 3\]; expected uint8 \[20"):
        corruption_layout(tmp_path, NAMES)


def test_corruption_config_errors_are_one_line(tmp_path):
    write_cifar_c(tmp_path, NAMES[:2], per_severity=4)
    with pytest.raises(ConfigError, match=r"^eval\.corruptions\.root=.* is invalid: .*missing: contrast\.npy$"):
        composed(f"eval.corruptions.root={tmp_path}", f"eval.corruptions.names=[{','.join(NAMES)}]")
    np.save(tmp_path / "labels.npy", np.full(20, 42, dtype=np.uint8))  # CIFAR-100-C labels for a 10-class head
    cfg = composed(f"eval.corruptions.root={tmp_path}", f"eval.corruptions.names=[{','.join(NAMES[:2])}]")
    with pytest.raises(ConfigError, match=r"labels\.npy has label 42 but the heads have 10 classes"):
        check_eval_inputs(cfg)


class MeanColour(nn.Module):
    """Predicts class 0 for dark images, 1 for bright ones (a fixed rule, so accuracy is computable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=1)


def test_corruption_accuracy_per_name_and_severity(tmp_path):
    files = write_cifar_c(tmp_path, NAMES, per_severity=6, num_classes=2)
    cfg = {"eval": {"corruptions": {"root": str(tmp_path), "names": NAMES, "severities": [1, 3, 5],
                                    "n_examples": 5}}}
    out = measure_corruptions(cfg, CPU, MeanColour(), "slf", "test", batch=2)
    for name in NAMES:
        for sev in (1, 3, 5):
            block = files[name][(sev - 1) * 6:(sev - 1) * 6 + 5]
            pred = (block.reshape(5, -1).mean(1) / 255 > 0.5).astype(int)  # the rule, in numpy
            assert out[f"slf_c_{name}_s{sev}"] == pytest.approx(np.mean(pred == files["labels"][:5]))
        assert out[f"slf_c_{name}"] == pytest.approx(np.mean([out[f"slf_c_{name}_s{s}"] for s in (1, 3, 5)]))
    assert out["slf_c_mean"] == pytest.approx(np.mean([out[f"slf_c_{n}"] for n in NAMES]))
    assert out["slf_c_n"] == 5


# ----------------------------------------------------------------------------------- black-box

def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


def _transfer(surrogate: nn.Module, target: nn.Module | None, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(1)  # the same random start for every call
    pgd = pgd_config({"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "norm": "linf"})
    return clean_and_pgd_counts(surrogate, [(x, y)], pgd, evaluate_on=target)


def test_blackbox_counts_the_target_on_the_surrogates_examples():
    torch.manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 4, (64,))
    surrogate = _linear(0)
    y = surrogate(x).argmax(1)  # every image clean-correct for the surrogate: the attack has work to do
    white = _transfer(surrogate, None, x, y)
    assert white.robust < white.total  # the attack works on its own model
    # a target identical to the surrogate: the transferred attack is the white-box one
    same = _transfer(surrogate, copy.deepcopy(surrogate), x, y)
    assert (same.clean, same.robust, same.source_robust) == (white.clean, white.robust, white.robust)

    class Blind(nn.Module):  # ignores its input: no perturbation can change its predictions
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 4).float()

    blind = _transfer(surrogate, Blind(), x, y)
    assert blind.robust == blind.clean == int((y == 0).sum()) and blind.source_robust == white.robust


def test_blackbox_surrogate_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval\.blackbox\.surrogate=.* is invalid: file does not exist"):
        composed(f"eval.blackbox.surrogate={tmp_path / 'none.pt'}")
    with pytest.raises(ConfigError, match=r"^eval\.blackbox\.surrogate='teacher' is invalid: teacher needs a teacher"):
        composed("method=simclr", "eval.blackbox.surrogate=teacher")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cfg = composed(f"eval.blackbox.surrogate={tmp_path / 'junk.pt'}")
    with pytest.raises(ConfigError, match=r"^eval\.blackbox\.surrogate=.* is invalid: cannot be loaded"):
        check_eval_inputs(cfg)


# ----------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_evaluate_transfer_corruptions_blackbox_l2_autoattack(tmp_path):
    """One trainer.evaluate run: heads on a second dataset (synthetic) with 10% of its labels, CIFAR-10-C
    files, L2 AutoAttack and a black-box attack from a second checkpoint; all keys in results.json."""
    from trainer.checkpoint import save_model
    from trainer.models import build_encoder

    model_cfg = {"arch": "resnet18", "width": 4, "stem_padding": 1, "proj_hidden_dim": 32, "proj_output_dim": 16}
    paths = {}
    for seed, name in ((0, "student"), (1, "teacher")):
        torch.manual_seed(seed)
        paths[name] = tmp_path / name / "model.pt"
        paths[name].parent.mkdir()
        save_model(paths[name], build_encoder(model_cfg, "digits", with_projector=True), model_cfg, "digits",
                   {"method": "deacl", "stage": name})
    write_cifar_c(tmp_path / "c10c", NAMES[:2], per_severity=4)
    args = [sys.executable, "-m", "trainer.evaluate", f"checkpoint={paths['student']}",
            *tiny_overrides(tmp_path, **{"eval.autoattack.n_examples": "4", "cluster.cpus_per_worker": "1"}),
            "+data@eval.data=synthetic", "eval.data.train_size=200", "eval.data.test_size=40",
            "eval.label_fraction=0.1", f"eval.corruptions.root={tmp_path / 'c10c'}",
            f"eval.corruptions.names=[{','.join(NAMES[:2])}]", "eval.autoattack.norm=L2", "eval.autoattack.eps=0.5",
            f"eval.blackbox.surrogate={paths['teacher']}", "eval.blackbox.n_examples=16"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    run = next(p for p in (tmp_path / "out").iterdir() if p.name.startswith("eval-student-"))
    m = json.loads((run / "results.json").read_text())["evaluations"]["student"]
    assert "slf_sa" not in m and m["slf_on_synthetic_n_test"] == 40  # only transfer numbers, on its test split
    assert "heads train on 20 labelled images (label_fraction 0.1)" in log  # round(0.1 * 18) of each class
    assert "AutoAttack (standard, L2, eps 0.5) on 4 test images" in log
    assert {f"slf_on_synthetic_c_{n}_s{s}" for n in NAMES[:2] for s in range(1, 6)} <= set(m)
    assert m["slf_on_synthetic_c_n"] == 4 and 0 <= m["slf_on_synthetic_c_mean"] <= 1
    assert m["slf_on_synthetic_bb_n"] == 16 and "[student/surrogate/slf] epoch 1/1" in log
    assert "corruptions 2/2 corruptions" in log and "black-box PGD" in log
    assert "SLF@synthetic" in proc.stdout and "corruptions mean" in proc.stdout


def test_deacl_recipe_hands_the_teacher_to_the_evaluate_stages_as_surrogate(tmp_path):
    from trainer.recipes import plan, stage_payload

    cfg = composed("eval.blackbox.surrogate=teacher", f"output_dir={tmp_path}")
    artifacts = {"teacher": str(tmp_path / "teacher.pt"), "student": str(tmp_path / "student.pt")}
    payloads = {s.name: stage_payload(cfg, s, artifacts) for s in plan(cfg) if s.kind == "evaluate"}
    assert payloads["evaluate_student"]["surrogate"] == artifacts["teacher"]
    # the teacher's own stage gets it too, and the worker skips it there (white-box, not black-box)
    assert payloads["evaluate_teacher"]["surrogate"] == payloads["evaluate_teacher"]["model_path"]
    assert stage_payload(composed(), plan(composed())[-1], artifacts)["surrogate"] is None
