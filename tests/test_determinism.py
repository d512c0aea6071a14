"""Same seed, same numbers: the default recipe twice with one seed gives bit-identical checkpoints and
metrics; another seed gives other ones. The augmentations are counter-based per sample
(data_pipeline.seeded / views), so they are checked here too, without Ray."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from conf import compose
from data_pipeline.seeded import uniforms

TIMING = ("seconds", "epoch_time_s", "images_per_s")


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) checkpoint blob, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(run_dir.rglob("*.pt")):
        out.update(tensors(torch.load(f, map_location="cpu", weights_only=True), str(f.relative_to(run_dir))))
    return out


def metrics(obj):
    """A results / history structure without wall-clock timings."""
    if isinstance(obj, dict):
        return {k: metrics(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [metrics(v) for v in obj]
    return obj


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:5]}"


# ------------------------------------------------------------------------------------ fast

def test_uniforms_are_a_function_of_their_counters():
    idx = np.array([5, 17, 3])
    a = uniforms(0, 2, idx, 1, 6)
    assert a.shape == (3, 6) and (a >= 0).all() and (a < 1).all()
    assert np.array_equal(uniforms(0, 2, idx[::-1], 1, 6), a[::-1])  # per sample, not per position
    for changed in (uniforms(1, 2, idx, 1, 6), uniforms(0, 3, idx, 1, 6), uniforms(0, 2, idx, 2, 6)):
        assert not np.isclose(changed, a).any()
    big = uniforms(0, 0, np.arange(20000), 0, 4)
    assert abs(big.mean() - 0.5) < 0.01 and abs(np.corrcoef(big[:, 0], big[:, 1])[0, 1]) < 0.03


def test_views_do_not_depend_on_batching():
    """A sample's views are the same whichever batch it is in and wherever the batch starts."""
    from data_pipeline.views import AugmentConfig, make_views

    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    index = torch.tensor([10, 11, 12, 13, 14, 15])
    aug = AugmentConfig()
    whole = make_views(x, index, 3, ["ssl", "weak"], aug, seed=7)
    halves = [make_views(x[s], index[s], 3, ["ssl", "weak"], aug, seed=7) for s in (slice(0, 2), slice(2, 6))]
    for v in range(2):
        assert torch.allclose(whole[v], torch.cat([halves[0][v], halves[1][v]]), atol=1e-6)
    other_epoch = make_views(x, index, 4, ["ssl", "weak"], aug, seed=7)
    assert not torch.allclose(whole[0], other_epoch[0])


# ------------------------------------------------------------------------------------ slow

def _tiny(out: Path, data: Path, **extra: str) -> dict:
    return compose(tiny_overrides(out, **{
        "data.beton_dir": str(data), "data.resolution": "16", "data.val_fraction": "0.75",
        "method.train.batch_size": "64", "teacher.method.train.batch_size": "64", "eval.linear.batch_size": "64",
        "teacher.method.train.epochs": "2", "method.train.epochs": "2", "eval.autoattack.enabled": "false",
        "cluster.cpus_per_worker": "1", **extra}))


@pytest.fixture(scope="module")
def three_runs(ray_local, tmp_path_factory):
    """The default recipe (SimCLR teacher -> DeACL student -> SLF + PGD) at a tiny budget: seeds 0 and 1
    as one multi-seed run (parallel Tune trials), then seed 0 again in another output folder."""
    from trainer.recipes import run_dir, run_recipe
    from trainer.seeds import run_seeds, seed_config

    data = tmp_path_factory.mktemp("data")
    multi = _tiny(tmp_path_factory.mktemp("multi"), data, seeds="[0,1]")
    summary = run_seeds(multi, log=lambda m: None)
    runs = {"multi": summary, "multi_cfg": multi}
    for name, seed in (("a", 0), ("c", 1)):
        cfg = seed_config(multi, seed)
        runs[name] = {"cfg": cfg, "results": json.loads((run_dir(cfg) / "results.json").read_text()),
                      "dir": run_dir(cfg)}
    again = _tiny(tmp_path_factory.mktemp("again"), data, seed="0")
    runs["b"] = {"cfg": again, "results": run_recipe(again, log=lambda m: None), "dir": run_dir(again)}
    return runs


@pytest.mark.slow
def test_same_seed_same_checkpoints_and_metrics(three_runs):
    a, b = three_runs["a"], three_runs["b"]
    assert a["cfg"]["run_name"] == b["cfg"]["run_name"] and a["dir"] != b["dir"]
    assert metrics(a["results"]["evaluations"]) == metrics(b["results"]["evaluations"])
    ta, tb = checkpoint_tensors(a["dir"]), checkpoint_tensors(b["dir"])
    assert any("student/model.pt" in k for k in ta) and any("classifier_slf" in k for k in ta)
    assert_same_tensors(ta, tb)
    history = [json.loads((r["dir"] / "student" / "stage.json").read_text())["metrics"] for r in (a, b)]
    assert metrics(history[0]) == metrics(history[1])


@pytest.mark.slow
def test_another_seed_other_numbers(three_runs):
    a, c = three_runs["a"], three_runs["c"]
    ta, tc = checkpoint_tensors(a["dir"]), checkpoint_tensors(c["dir"])
    weights = [k for k in ta if k.startswith("student/model.pt") and k.endswith("weight")]
    assert weights and all(not torch.equal(ta[k], tc[k]) for k in weights)
    assert metrics(a["results"]["evaluations"]) != metrics(c["results"]["evaluations"])


@pytest.mark.slow
def test_multi_seed_run_reports_the_spread(three_runs):
    out = three_runs["multi"]
    summary = {(r["model"], r["protocol"], r["metric"]): r for r in out["summary"]}
    ra = summary[("student", "SLF", "RA_PGD")]
    assert ra["seeds"] == [0, 1] and ra["n"] == 2 and len(ra["values"]) == 2
    assert ra["mean"] == pytest.approx(sum(ra["values"]) / 2)
    saved = json.loads((Path(out["dir"]) / "results.json").read_text())
    assert set(saved["seeds"]) == {"0", "1"} and saved["summary"] == out["summary"]
    assert (Path(out["dir"]) / "results.csv").read_text().count("\n") == 1 + len(out["summary"])
    assert Path(out["figure"]).stat().st_size > 10_000
    # the same command again reuses both seeds: the same numbers, nothing trains again
    from trainer.seeds import run_seeds

    student = Path(three_runs["a"]["dir"]) / "student" / "model.pt"
    before = student.stat().st_mtime_ns
    assert run_seeds(three_runs["multi_cfg"], log=lambda m: None)["summary"] == out["summary"]
    assert student.stat().st_mtime_ns == before
