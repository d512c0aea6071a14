"""The empirical study (tune/study.py): its plan and validation, and one tiny end-to-end run on
digits through Ray Tune + Ray Train + FFCV that writes the comparison table and the CKA figures."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_overrides
from conf import ConfigError
from tune.study import SCENARIOS, compose_study, format_study_table


def test_plan_has_every_scheme_twice_and_shares_data(tmp_path):
    study = compose_study([f"output_dir={tmp_path}"])
    assert list(study["trials"]) == ["SL-standard", "SL-adversarial", "CL-standard", "CL-adversarial",
                                     "SCL-standard", "SCL-adversarial"]
    t = study["trials"]
    assert t["SL-standard"]["method"]["loss"] == "ce" and t["SL-adversarial"]["method"]["loss"] == "pgd_at"
    assert t["CL-adversarial"]["method"]["use_labels"] is False and t["CL-adversarial"]["method"]["adversarial"] is True
    assert t["SCL-standard"]["method"]["use_labels"] is True and t["SCL-standard"]["method"]["adversarial"] is False
    # the study's Table 1: ST and AT use SLF heads, partial-AT an ALF head and full-AT AFF, all on the
    # adversarial encoder: the standard encoders need only SLF
    assert all(c["eval"]["protocols"] == (["slf", "alf", "aff"] if k.endswith("adversarial") else ["slf"])
               and c["recipe"] == "pretrain" for k, c in t.items())
    assert study["scenarios"]["partial-AT"] == ("adversarial", "alf")
    assert study["scenarios"]["full-AT"] == ("adversarial", "aff")
    assert len({c["run_name"] for c in t.values()}) == 6
    assert len({c["data"]["beton_dir"] for c in t.values()}) == 1  # one copy of the dataset
    assert all(c["output_dir"].startswith(study["dir"]) for c in t.values())
    assert set(SCENARIOS) == {"ST", "AT", "partial-AT", "full-AT"}
    # the same command gives the same study folder (restartable); another budget another folder
    assert compose_study([f"output_dir={tmp_path}"])["dir"] == study["dir"]
    assert compose_study([f"output_dir={tmp_path}", "method.train.epochs=3"])["dir"] != study["dir"]


def test_study_with_several_seeds(tmp_path):
    from tune.study import trial_key

    study = compose_study([f"output_dir={tmp_path}", "seeds=[0,1]"])
    assert study["seeds"] == [0, 1] and len(study["trials"]) == 12
    t = study["trials"]
    a, b = t[trial_key("SL", "standard", 0, [0, 1])], t[trial_key("SL", "standard", 1, [0, 1])]
    assert (a["seed"], b["seed"], a["seeds"]) == (0, 1, None) and a["run_name"] != b["run_name"]
    assert {k for k in t if k.startswith("SL-standard")} == {"SL-standard-seed0", "SL-standard-seed1"}


def test_bad_studies_are_refused_before_ray(tmp_path):
    with pytest.raises(ConfigError, match=r"study.run contains 'RL': allowed: SL, CL, SCL"):
        compose_study([f"output_dir={tmp_path}", "study.run=[SL,RL]"])
    with pytest.raises(ConfigError, match="the study chooses each trial's method"):
        compose_study([f"output_dir={tmp_path}", "method=acl"])
    with pytest.raises(ConfigError, match=r"attack.eps=-1 is invalid: must be a number in \[0, 1\]"):
        compose_study([f"output_dir={tmp_path}", "attack.eps=-1"])
    with pytest.raises(ConfigError, match=r"study.schemes.SL.method='foo' is invalid"):
        compose_study([f"output_dir={tmp_path}", "study.schemes.SL.method=foo"])
    proc = subprocess.run([sys.executable, "-m", "tune.study", f"output_dir={tmp_path}", "study.run=[]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("config error: study.run=[] is invalid")


def test_table_layout():
    rows = [{"scheme": s, "scenario": sc, "SA": 90.0 - i, "RA_PGD": 10.0 + i, "SA_std": 0.5, "RA_PGD_std": 0.25,
             "n": 1} for s in ("SL", "CL") for i, sc in enumerate(SCENARIOS)]
    text = format_study_table(rows, 20)
    assert text.splitlines()[0].split("|")[0].strip().startswith("scheme")
    assert "SL" in text and "partial-AT" in text and "RA: PGD-20" in text
    assert "   87.00   13.00 |" in text.splitlines()[3]  # SL's full-AT cell
    assert "std" not in text
    several = format_study_table([{**r, "n": 3} for r in rows], 20)
    assert "    0.50    0.25 |" in several.splitlines()[4] and "over 3 seeds" in several  # SL's spread line


@pytest.mark.slow
def test_study_end_to_end(tmp_path, ray_local):
    """The paper preset `study=study_cifar10` on digits, schemes SL and CL (SCL is CL's code path with
    labels): 4 trials (width-4 ResNet-50s, 1 epoch each, 1-epoch heads, PGD-1 training / PGD-2
    reporting attacks), table + figures; then the same command again reuses every trial. (At this
    budget the encoders stay near chance: this checks the machinery; docs/evaluation.md has a run
    that learns.)"""
    import matplotlib.image as mpimg

    from tune.study import run_study

    over = tiny_overrides(tmp_path, **{"method.train.batch_size": "256", "attack.steps": "1",
                                       "method.attack.steps": "1", "eval.train_attack_steps": "1"})
    over = [o for o in over if not o.startswith("teacher.")]
    over += ["study=study_cifar10", "study.overrides=['preset=study','data=digits']", "study.run=[SL,CL]",
             "analysis.n_examples=64", "analysis.n_probe_train=128", "analysis.probe_max_iter=10",
             "analysis.pgd.steps=2", "analysis.batch_size=64", "eval.autoattack.enabled=false",
             "cluster.cpus_per_worker=1"]  # two trials at once on the test's 3 Ray CPUs
    study = compose_study(over)
    summary = run_study(study)
    out = tmp_path / "out" / study["name"]
    assert summary["dir"] == str(out)
    with open(out / "study_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scheme"], r["scenario"]) for r in rows] == [(s, sc) for s in ("SL", "CL") for sc in SCENARIOS]
    for r in rows:
        assert 0 <= float(r["RA_PGD"]) <= float(r["SA"]) + 1e-9 <= 100 + 1e-9
    # the table's cells come from the trials' own evaluations
    runs = json.loads((out / "study.json").read_text())["trials"]
    sl_std = json.loads((tmp_path / "out" / study["name"] / "runs" / runs["SL-standard"]["run_dir"].split("/")[-1]
                         / "results.json").read_text())
    ev = next(iter(sl_std["evaluations"].values()))
    st = next(r for r in rows if r["scheme"] == "SL" and r["scenario"] == "ST")
    assert float(st["SA"]) == pytest.approx(100 * ev["slf_sa"])
    figures = [p for p in summary["figures"]]
    for name in ("study_scenarios.png", "cka_clean_vs_adv.png"):
        assert str(out / name) in figures
    for scheme in ("SL", "CL"):
        assert (out / "cka" / scheme / "cka_cross.png").exists()
        assert (out / "cka" / scheme / "analysis.json").exists()
    for p in figures:
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 200, p
    # the same study again: every trial's stages are reused, same table
    again = run_study(compose_study(over))
    assert again["rows"] == summary["rows"]
