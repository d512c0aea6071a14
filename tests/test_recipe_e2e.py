"""End to end through Ray Train + FFCV: SimCLR teacher -> DeACL student -> SLF evaluation.

The claim of the default recipe, on a fixed seed with a reduced budget: the DeACL student's
PGD robust accuracy is clearly above the SimCLR teacher's under the same linear evaluation.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_overrides
from conf import compose
from trainer.recipes import run_recipe
from trainer.results import format_table


@pytest.mark.slow
def test_deacl_student_more_robust_than_teacher(tmp_path, ray_local):
    cfg = compose(tiny_overrides(
        tmp_path,
        **{"model.width": "8", "teacher.method.train.epochs": "6", "method.train.epochs": "6",
           "eval.linear.epochs": "40", "eval.linear.batch_size": "64", "eval.linear.milestones": "[30]",
           "eval.pgd.steps": "10",
           "eval.autoattack.enabled": "false", "monitor.knn_every": "3",
           "eval.curve.eps": "[0.0314,0.0627,0.1255]", "eval.curve.steps": "5"}))
    results = run_recipe(cfg)
    out = tmp_path / "out" / cfg["run_name"]
    saved = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in saved["table"]}
    print(format_table(saved["table"], 10))
    assert set(rows) == {"teacher", "student"}
    assert (out / "results.csv").exists()
    assert (out / "teacher" / "model.pt").exists() and (out / "student" / "model.pt").exists()
    teacher, student = rows["teacher"], rows["student"]
    assert teacher["SA"] > 25 and student["SA"] > 25, "linear heads did not learn (chance is 10%)"
    # "Clearly above" at this budget (width-8 encoders, 6+6 epochs, PGD-5 training and PGD-10 reporting
    # at the demo's 16/255): measured teacher 5.0 vs student 16.4 (FFCV's crops are not seeded, so
    # runs vary by a few points). At least 1.5x the teacher's and 5 points above it.
    assert student["RA_PGD"] >= 1.5 * teacher["RA_PGD"] and student["RA_PGD"] > teacher["RA_PGD"] + 5, \
        (teacher, student)
    # the robustness curve: SA at eps 0, then falling with eps (within a point: PGD-5 vs PGD-10)
    for r in (teacher, student):
        curve = [r["SA"]] + [r[f"curve_RA_at_{e:.6f}"] for e in (0.0314, 0.0627, 0.1255)]
        assert all(b <= a + 1 for a, b in zip(curve, curve[1:])), curve
    assert (out / "robustness_curve.png").exists()
    # The teacher model file is exactly what stage 1 produced: stage 2 did not touch it.
    ray_ckpts = sorted(p for p in (tmp_path / "out" / "ray_results" / f"{cfg['run_name']}-teacher").glob("checkpoint_*") if p.is_dir())
    final = torch.load(ray_ckpts[-1] / "model.pt", weights_only=True)["encoder"]
    kept = torch.load(out / "teacher" / "model.pt", weights_only=True)["encoder"]
    assert all(torch.equal(final[k], kept[k]) for k in final)
    # A second run with the same config reuses every finished stage.
    again = run_recipe(cfg)
    assert again["evaluations"] == results["evaluations"]
