"""`python -m trainer.evaluate` end to end under Ray Train on a tiny checkpoint, then
`python -m trainer.analyze_representations` on what it wrote (PNG figures, JSON, NPZ)."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_overrides
from trainer.checkpoint import save_model
from trainer.models import build_encoder

MODEL_CFG = {"arch": "resnet18", "width": 4, "stem_padding": 1, "proj_hidden_dim": 32, "proj_output_dim": 16}
PROTOCOLS = ["slf", "alf", "le", "rle"]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Write a width-4 encoder checkpoint and evaluate it with four protocols in one Ray Train run."""
    tmp = tmp_path_factory.mktemp("evalcli")
    torch.manual_seed(0)
    enc = build_encoder(MODEL_CFG, "digits", with_projector=True)
    ckpt = tmp / "teacher" / "model.pt"
    ckpt.parent.mkdir()
    save_model(ckpt, enc, MODEL_CFG, "digits", {"method": "simclr", "stage": "teacher", "epoch": 1})
    args = ["-m", "trainer.evaluate", f"checkpoint={ckpt}",
            *tiny_overrides(tmp, **{"eval.autoattack.n_examples": "4", "cluster.cpus_per_worker": "1"}),
            f"eval.protocols=[{','.join(PROTOCOLS)}]", "eval.alf_loss=pgd_at", "eval.train_attack_steps=1",
            "eval.linear.batch_size=256", "eval.curve.eps=[0.0314,0.0627]", "eval.curve.steps=2",
            "eval.label_fraction=0.5"]  # the heads on a stratified half of the training split
    proc = _run(args)
    return {"tmp": tmp, "ckpt": ckpt, "stdout": proc.stdout, "log": proc.stdout + proc.stderr, "args": args}


@pytest.mark.slow
def test_evaluate_cli_table_json_csv(evaluated):
    out_root = evaluated["tmp"] / "out"
    runs = [p for p in out_root.iterdir() if p.name.startswith("eval-teacher-")]
    assert len(runs) == 1, list(out_root.iterdir())
    run = runs[0]
    stdout = evaluated["stdout"]
    # the papers' layout: one row for the model, SA / RA / AA under each protocol
    header = next(line for line in stdout.splitlines() if "SLF" in line and "RLE" in line)
    assert [w for w in header.split("|") if w.strip()] and header.index("SLF") < header.index("ALF")
    row = next(line for line in stdout.splitlines() if line.startswith("teacher"))
    assert len(row.replace("|", " ").split()) == 1 + 3 * len(PROTOCOLS)

    results = json.loads((run / "results.json").read_text())
    m = results["evaluations"]["teacher"]
    for p in PROTOCOLS:
        for k in ("sa", "ra", "aa"):
            assert 0.0 <= m[f"{p}_{k}"] <= 1.0
        assert m[f"{p}_n_test"] == 360  # the whole digits test split
        assert m[f"{p}_aa_n"] == 4
        # SA / PGD on AutoAttack's 4 images, and AutoAttack's robust accuracy after each of its attacks
        assert 0.0 <= m[f"{p}_aa_ra"] <= m[f"{p}_aa_sa"] <= 1.0
        after = [m[f"{p}_aa_after_{a}"] for a in ("apgd_ce", "apgd_t", "fab_t", "square")]
        assert after == sorted(after, reverse=True) and after[-1] == pytest.approx(m[f"{p}_aa"])
        curve = [m[f"{p}_curve_ra_at_{e:.6f}"] for e in (0.0314, 0.0627)]
        assert all(0.0 <= c <= 1.0 for c in curve)
        assert m[f"{p}_ra"] <= m[f"{p}_sa"] + 1e-9
        assert (run / "evaluate_model" / f"classifier_{p}.pt").exists()
    assert results["checkpoint"]["path"] == str(evaluated["ckpt"])
    assert results["checkpoint"]["meta"]["stage"] == "teacher"
    assert results["eval_settings"]["alf_loss"] == "pgd_at"

    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["protocol"] for r in rows] == [p.upper() for p in PROTOCOLS]
    assert float(rows[0]["SA"]) == pytest.approx(100 * m["slf_sa"])
    assert float(rows[0]["AA_SA"]) == pytest.approx(100 * m["slf_aa_sa"])
    assert float(rows[0]["curve_RA_at_0.031400"]) == pytest.approx(100 * m["slf_curve_ra_at_0.031400"])
    assert (run / "robustness_curve.png").exists() and str(run / "robustness_curve.png") in results["figures"]
    log = evaluated["log"]
    assert "] AutoAttack (standard, Linf, eps 0.06275) on 4 test images: " in log, log[-3000:]
    assert "] PGD-2 (AutoAttack's images) 1/1 batches images 4 robust_so_far" in log, log[-3000:]
    labelled = re.search(r"heads train on (\d+) labelled images \(label_fraction 0.5\)", log)
    # half of each class of the 1,293 training images (digits holds 10% of its 1,437 out for validation)
    assert labelled and abs(int(labelled.group(1)) - 0.5 * 1293) <= 5, labelled
    assert "] PGD-2 (test split) 1/2 batches images 256 robust_so_far" in log, log[-3000:]
    with open(run / "results_paper.csv") as f:
        wide = list(csv.DictReader(f))
    assert len(wide) == 1 and wide[0]["model"] == "teacher"
    assert float(wide[0]["RLE_RA"]) == pytest.approx(100 * m["rle_ra"])

    # the classifier files are self-contained (the analysis CLI loads them)
    blob = torch.load(run / "evaluate_model" / "classifier_rle.pt", weights_only=True)
    assert blob["model_cfg"]["width"] == 4 and blob["num_classes"] == 10 and blob["protocol"] == "rle"


@pytest.mark.slow
def test_analyze_representations_cli_writes_figures(evaluated):
    run = next(p for p in (evaluated["tmp"] / "out").iterdir() if p.name.startswith("eval-teacher-"))
    out = evaluated["tmp"] / "analysis"
    _run(["-m", "trainer.analyze_representations", f"checkpoint={run / 'evaluate_model' / 'classifier_slf.pt'}",
          f"checkpoint_b={evaluated['ckpt']}", f"out={out}", f"output_dir={evaluated['tmp'] / 'out'}",
          f"data.beton_dir={evaluated['tmp'] / 'data'}", "analysis.n_examples=48", "analysis.n_probe_train=96",
          "analysis.pgd.steps=2", "analysis.probe_max_iter=20"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["cka_a_clean_vs_adv.png", "cka_a_within.png", "cka_b_clean_vs_adv.png", "cka_b_within.png",
                    "cka_cross.png", "probes.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    res = json.loads((out / "analysis.json").read_text())
    a, b = res["models"]["a"], res["models"]["b"]
    assert a["label"] == "teacher/slf" and a["attacked_classifier"] == "given classifier"
    assert b["attacked_classifier"].startswith("linear probe")
    layers = a["layers"]
    assert layers == ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
    within = np.asarray(a["cka_within_clean"])
    assert within.shape == (6, 6) and np.allclose(np.diag(within), 1.0, atol=1e-6)
    # an SLF head leaves its encoder untouched (bn_mode=eval): A's and B's layers are identical
    cross = np.asarray(res["cross"]["cka_clean"])
    assert np.allclose(np.diag(cross), 1.0, atol=1e-6)
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in a["cka_same_layer_clean_vs_adv"])
    assert set(a["probes"]) == {"clean", "adv", "adv_trained"} and len(a["probes"]["clean"]) == 6
    npz = np.load(out / "analysis.npz")
    assert np.allclose(npz["a_cka_within_clean"], within)


def test_cli_errors_are_one_line(tmp_path, capsys):
    """Bad arguments: exit status 2 and one line, before Ray or any data is touched."""
    from trainer import analyze_representations, evaluate

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"something": 1}, tmp_path / "other.pt")
    for main, args, expected in [
        (evaluate.main, [], "config error: checkpoint=None is invalid"),
        (evaluate.main, [f"checkpoint={tmp_path}/nope.pt"], "config error: checkpoint="),
        (evaluate.main, [f"checkpoint={tmp_path}/junk.pt"], "config error: checkpoint="),
        (evaluate.main, [f"checkpoint={tmp_path}/other.pt"], "config error: checkpoint="),
        (evaluate.main, [f"checkpoint={tmp_path}/other.pt", "eval.alf_loss=kl"], "config error: eval.alf_loss="),
        (evaluate.main, [f"checkpoint={tmp_path}/other.pt", "recipe=deacl"], "config error: recipe="),
        (analyze_representations.main, [f"checkpoint={tmp_path}/nope.pt"], "config error: checkpoint="),
        (analyze_representations.main, [f"checkpoint={tmp_path}/other.pt", "analysis.cka_pooling=max"],
         "config error: analysis.cka_pooling="),
        (analyze_representations.main, [f"checkpoint={tmp_path}/junk.pt"], "config error: checkpoint="),
        (analyze_representations.main, [f"checkpoint={tmp_path}/other.pt"], "config error: checkpoint="),
    ]:
        assert main([*args, f"output_dir={tmp_path}/out"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(expected), err
    assert not (tmp_path / "out").exists()


def test_frozen_protocols_bn_mode(tmp_path):
    """bn_mode=eval keeps a frozen encoder's BN statistics; bn_mode=train (DeACL's quirk) moves them."""
    from trainer.evaluation.protocols import Classifier, protocol_loss, set_train_modes

    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    for bn_mode, moves in (("eval", False), ("train", True)):
        model = Classifier(build_encoder(MODEL_CFG, "digits", with_projector=False), 10)
        before = model.encoder.backbone.bn1.running_mean.clone()
        set_train_modes(model, full=False, bn_mode=bn_mode)
        assert model.head.training
        with torch.no_grad():
            model.encoder(x)
        assert (not torch.equal(before, model.encoder.backbone.bn1.running_mean)) == moves
    model = Classifier(build_encoder(MODEL_CFG, "digits", with_projector=False), 10)
    set_train_modes(model, full=True, bn_mode="eval")
    assert model.encoder.training
    assert protocol_loss("alf", {"alf_loss": "pgd_at"}) == "pgd_at"
    assert protocol_loss("alf", {"alf_loss": "trades"}) == "trades"
    assert protocol_loss("rle", {"alf_loss": "trades"}) == "pgd_at"
    assert protocol_loss("le", {"alf_loss": "trades"}) == "ce"
