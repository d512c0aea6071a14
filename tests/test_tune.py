"""Tune: search-space parsing, the validation monitor, and one real ASHA sweep on digits that is
interrupted (SIGUSR1, as Ctrl+C) after two trials finished, restored to completion, and analysed."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_overrides
from conf import ConfigError, compose

PY = sys.executable


# --------------------------------------------------------------------------- fast checks

def test_space_parsing_and_relative_keys(tmp_path):
    from ray import tune as rtune

    from tune.search import compose_sweep
    from tune.space import apply_params, param_space, parse_number

    cfg, base = compose_sweep(["tune=demo", f"output_dir={tmp_path}"])
    assert base[: len(cfg["tune"]["overrides"])] == cfg["tune"]["overrides"] and base[-1] == f"output_dir={tmp_path}"
    assert cfg["monitor"]["robust_every"] == 1 and cfg["method"]["name"] == "deacl"
    assert parse_number("8/255", "k") == pytest.approx(8 / 255)
    ps = param_space(cfg["tune"]["space"])
    assert isinstance(ps["attack.eps"], rtune.search.sample.Float)
    assert isinstance(ps["attack.steps"], rtune.search.sample.Categorical)
    trial = apply_params(cfg, {"attack.eps": 0.04, "attack.alpha": 0.5, "method.lam": 3.0}, cfg["tune"]["space"])
    assert trial["attack"]["alpha"] == pytest.approx(0.02)  # relative_to attack.eps
    assert trial["method"]["lam"] == 3.0 and cfg["method"]["lam"] != 3.0  # base untouched


def test_bad_sweeps_are_refused(tmp_path):
    from tune.search import compose_sweep
    from tune.space import check_space

    cfg, _ = compose_sweep(["tune=demo", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="attack.epz: no such config key"):
        check_space({"attack.epz": {"type": "uniform", "low": 0, "high": 1}}, cfg)
    with pytest.raises(ConfigError, match="type='normal' is invalid"):
        check_space({"attack.eps": {"type": "normal", "low": 0, "high": 1}}, cfg)
    with pytest.raises(ConfigError, match="attack.eps=2.0.*invalid config.*attack.eps=2.0 is invalid"):
        check_space({"attack.eps": {"type": "uniform", "low": 0.01, "high": 2.0}}, cfg)
    with pytest.raises(ConfigError, match="attack.alpha=0.0 is invalid"):  # eps=0 -> relative alpha 0
        check_space({"attack.eps": {"type": "grid", "values": [0.0, 0.03]},
                     "attack.alpha": {"type": "uniform", "low": 0.25, "high": 0.5, "relative_to": "attack.eps"}}, cfg)
    with pytest.raises(ConfigError, match="monitor.robust_every=0 is invalid for a sweep"):
        compose_sweep(["tune=demo", "monitor.robust_every=0", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="tune.enabled=False"):
        compose_sweep([f"output_dir={tmp_path}"])
    # the monitor never falls back to the test split
    with pytest.raises(ConfigError, match="needs a held-out validation split"):
        compose(["monitor.robust_every=1", "data.val_fraction=0", "data.splits=[train,test]",
                 f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="tune.objective"):
        compose(["tune=demo", "tune.objective=best", f"output_dir={tmp_path}"])


def test_concurrency_from_cluster_size(tmp_path):
    from tune.search import compose_sweep, max_concurrent

    cfg, _ = compose_sweep(["tune=demo", "cluster.num_workers=2", "cluster.cpus_per_worker=4",
                            f"output_dir={tmp_path}"])
    assert max_concurrent(cfg, {"CPU": 64, "GPU": 8}, gpu=False) == 7      # 64 / (2*4 + 0.01)
    assert max_concurrent(cfg, {"CPU": 64, "GPU": 8}, gpu=True) == 4       # 8 GPUs / 2 per trial
    assert max_concurrent(cfg, {"CPU": 3}, gpu=False) == 1
    cfg["tune"]["max_concurrent_trials"] = 3
    assert max_concurrent(cfg, {"CPU": 3}, gpu=False) == 3


def test_linear_probe_objective_and_pareto():
    from tune.analyze import pareto_front
    from trainer.evaluation.monitor import objective_value
    from trainer.evaluation.probes import fit_linear_probe

    torch.set_num_threads(1)  # tiny problem: threads only contend on a loaded machine
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(5, 16, generator=g)
    y = torch.arange(500) % 5
    x = centers[y] + torch.randn(500, 16, generator=g)
    probe = fit_linear_probe(x, y, 5, max_iter=50)
    assert (probe(x).argmax(1) == y).float().mean() > 0.95
    assert objective_value(0.8, 0.4, {"objective": "weighted", "objective_weight": 0.25}) == pytest.approx(0.7)
    assert objective_value(0.8, 0.4, {"objective": "robust", "objective_weight": 0.5}) == 0.4
    assert pareto_front([(80, 40), (70, 50), (75, 30), (60, 45), (85, 10)]) == [1, 0, 4]


# --------------------------------------------------------------------------- one real sweep

def _history(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    """6 DeACL trials x <= 2 epochs; interrupted after 2 trials finished, then restored."""
    from ray.tune import Callback

    from trainer.checkpoint import save_model
    from trainer.models import build_encoder
    from tune.analyze import trial_statuses
    from tune.search import check_sweep_config, compose_sweep, run_sweep, sweep_dir

    tmp = tmp_path_factory.mktemp("tune")
    tiny = tiny_overrides(tmp, **{"method.train.epochs": "2", "monitor.val_attack.steps": "2",
                                  "monitor.probe_steps": "30", "method.train.batch_size": "256",
                                  "attack.steps": "1"})
    tiny = [o for o in tiny if not o.startswith("monitor.knn_every")]
    # A teacher checkpoint made directly (random weights): the sweep's own teacher training is the
    # same run_train_stage path as every trial, and skipping it keeps this test short.
    plain = compose(tiny)
    teacher = tmp / "teacher.pt"
    save_model(teacher, build_encoder(plain["model"], plain["data"]["stats"], with_projector=False),
               plain["model"], plain["data"]["stats"])
    cfg, base = compose_sweep(["tune=demo", *tiny, f"teacher.checkpoint={teacher}", "tune.num_samples=3",
                               "tune.verbose=0", "tune.max_concurrent_trials=2"])
    # eps=1/1000 trains (almost) no robustness: the grid alternates good and hopeless trials, so
    # ASHA has something to stop at the epoch-1 rung whatever the noise; lam and alpha are sampled.
    cfg["tune"]["space"] = {"attack.eps": {"type": "grid", "values": ["16/255", "1/1000"]},
                            "attack.alpha": {"type": "uniform", "low": 0.25, "high": 0.5,
                                             "relative_to": "attack.eps"},
                            "method.lam": {"type": "loguniform", "low": 1.0, "high": 8.0}}
    cfg["tune"]["objective"] = "robust"
    check_sweep_config(cfg)
    path = Path(sweep_dir(cfg))

    marker = tmp / "interrupted_at.json"

    class Interrupt(Callback):
        """After 2 finished trials, interrupt as soon as a trial reported an epoch and goes on (so
        that one is mid-way: it must resume from its checkpoint); at the latest after 4 finished.
        Tuner.restore brings the RunConfig's callbacks back too: armed through the environment."""

        def __init__(self):
            self.done = 0

        def _fire(self, why, trial_id=None):
            if os.environ.get("TUNE_TEST_INTERRUPT") == "1" and not marker.exists():
                marker.write_text(json.dumps({"why": why, "trial_id": trial_id, "finished": self.done}))
                os.kill(os.getpid(), signal.SIGUSR1)  # what Ctrl+C does: Tune saves state and stops

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.done >= 2 and not result.get("done") and result.get("epoch", 0) < 2:
                self._fire("mid-way", trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done >= 4:
                self._fire("finished")

    first = _sweep_interrupted_by(Interrupt(), cfg, base)
    statuses = trial_statuses(path)
    before = {tid: _history(path / f"trial_{tid}") for tid in statuses if (path / f"trial_{tid}" / "result.json").exists()}
    finished_before = {tid for tid, s in statuses.items() if s == "TERMINATED"}
    second = run_sweep(cfg, base, resume="true", log=lambda m: None)
    return {"cfg": cfg, "dir": path, "first": first, "second": second, "before": before,
            "statuses_before": statuses, "finished_before": finished_before,
            "statuses_after": trial_statuses(path),
            "interrupted_at": json.loads(marker.read_text()) if marker.exists() else None}


@pytest.mark.slow
def test_interrupted_sweep_restores_without_repeating(sweep):
    path = sweep["dir"]
    assert sweep["first"]["unfinished"] > 0, "the sweep was not interrupted"
    assert len(sweep["finished_before"]) >= 2
    after = sweep["statuses_after"]
    assert len(after) == 6 and set(after.values()) == {"TERMINATED"}, after
    assert sweep["second"]["unfinished"] == 0
    for tid in sweep["finished_before"]:  # finished trials were not run again
        assert _history(path / f"trial_{tid}") == sweep["before"][tid]
    for tid in after:  # result.json is appended to: a Train run restarted from scratch would repeat epoch 1
        epochs = [r["epoch"] for r in _history(path / f"trial_{tid}")]
        assert epochs == sorted(set(epochs)), f"trial {tid} repeated an epoch: {epochs}"
    resumed = [tid for tid in after if tid not in sweep["finished_before"] and sweep["before"].get(tid)]
    print(f"interrupted at {sweep['interrupted_at']}; resumed mid-way from their Train checkpoint: {resumed}")
    if sweep["interrupted_at"]["why"] == "mid-way":
        tid = sweep["interrupted_at"]["trial_id"]
        assert tid in resumed
        assert [r["epoch"] for r in _history(path / f"trial_{tid}")] == [1, 2]


@pytest.mark.slow
def test_asha_stops_some_trials_early(sweep):
    from tune.analyze import load_sweep

    sw = load_sweep(sweep["dir"])
    epochs = {t["trial_id"]: t["epochs"] for t in sw["trials"]}
    assert sw["max_t"] == 2
    assert any(e < 2 for e in epochs.values()), epochs
    assert any(e == 2 for e in epochs.values()), epochs
    for t in sw["trials"]:  # the metric is the val monitor's, at the fixed attack
        last = t["history"][-1]
        assert last["val_n"] == 144 and 0 <= last["val_robust_acc"] <= last["val_clean_acc"] + 1e-9
        assert last["objective"] == last["val_robust_acc"]
        assert Path(last["checkpoint_path"], "model.pt").exists()


@pytest.mark.slow
def test_analysis_writes_table_and_plots(sweep, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "analysis"
    proc = subprocess.run([PY, "-m", "tune.analyze", str(sweep["dir"]), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "python -m trainer.run" in proc.stdout and "stopped early by ASHA" in proc.stdout
    rows = (out / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("rank,trial_id,status,epochs,asha_stopped,objective")
    for name in ("learning_curves", "pareto", "param_effects"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(png)
        assert img.shape[0] > 200 and img.shape[1] > 200
    best = json.loads((out / "best.json").read_text())
    assert best["epochs"] == 2 and best["config"]["attack.eps"] == pytest.approx(16 / 255)
    assert best["command"].startswith("python -m trainer.run ") and "tune=" not in best["command"]
    # the command is a valid configuration for the trainer
    args = shlex.split(best["command"])[3:]
    cfg = compose(args)
    assert cfg["attack"]["eps"] == pytest.approx(16 / 255)
    assert cfg["attack"]["alpha"] == pytest.approx(best["config"]["attack.alpha"])
    if os.environ.get("TUNE_KEEP_PLOTS"):
        import shutil

        shutil.copytree(out, os.environ["TUNE_KEEP_PLOTS"], dirs_exist_ok=True)


def test_cli_plan_and_errors(tmp_path, capsys):
    from tune.search import main

    assert main(["tune=demo", f"output_dir={tmp_path}", "--cfg"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["max_t"] == 4 and plan["metric"] == "objective" and "attack.eps" in plan["space"]
    assert plan["sweep_dir"].startswith(str(tmp_path)) and "sweep-demo-deacl-digits-" in plan["sweep_dir"]
    assert main(["tune=demo", "tune.mode=up", f"output_dir={tmp_path}"]) == 2
    assert "tune.mode='up' is invalid" in capsys.readouterr().err
    assert main(["tune=demo", "resume=maybe"]) == 2


def test_seed_spread_groups_trials_that_differ_only_in_seed():
    from tune.analyze import seed_spread

    def trial(seed, lam, metric, full=True):
        return {"effective": {"seed": seed, "method.lam": lam}, "metric": metric, "full_budget": full}

    sw = {"metric": "objective", "trials": [trial(0, 1.0, 0.5), trial(1, 1.0, 0.7), trial(2, 1.0, 0.6),
                                            trial(0, 2.0, 0.4), trial(1, 2.0, 0.9, full=False)]}
    (row,) = seed_spread(sw)
    assert row["method.lam"] == 1.0 and row["n"] == 3 and row["seeds"] == "0 1 2"
    assert row["objective_mean"] == pytest.approx(0.6) and row["objective_std"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- search algorithms, budgets

def test_search_alg_and_time_attr_are_checked(tmp_path):
    from tune.search import compose_sweep
    from tune.searchers import check_searchable

    base = ["tune=demo", f"output_dir={tmp_path}"]
    for extra, message in (
            (["tune.search_alg=tpe"], "tune.search_alg='tpe' is invalid: allowed: random, optuna, bohb"),
            (["tune.time_attr=flops"], "tune.time_attr='flops' is invalid: allowed: epoch, compute"),
            (["tune.time_attr=compute"], "tune.scheduler.max_t=None is invalid with tune.time_attr=compute"),
            (["tune.time_attr=compute", "tune.scheduler.max_t=100", "tune.scheduler.grace_period=200"],
             "grace_period=200 is invalid: must be an integer in \\[1, tune.scheduler.max_t=100\\]"),
            (["tune.scheduler.max_t=5"], "tune.scheduler.max_t=5 is invalid: must be an integer in \\[1, "
                                         "method.train.epochs=4\\]"),
            (["tune.search_alg=bohb", "tune.scheduler.name=fifo"], "invalid with tune.search_alg=bohb"),
            (["tune.search_alg=bohb", "tune.time_attr=compute", "tune.scheduler.max_t=9"],
             "tune.time_attr='compute' is invalid with tune.search_alg=bohb"),
            (["tune=asha_bench", "tune.search_alg=optuna"], "tune.space.attack.eps: type=grid cannot be searched")):
        with pytest.raises(ConfigError, match=message):
            compose_sweep([*base, *extra])
    with pytest.raises(ConfigError, match=r"value \[0.5, 0.5\] cannot be searched by tune.search_alg=optuna"):
        check_searchable({"method.stream_weights": {"type": "choice", "values": [[0.5, 0.5], [0.3, 0.7]]}}, "optuna")
    with pytest.raises(ConfigError, match="type=quniform cannot be searched by tune.search_alg=bohb"):
        check_searchable({"attack.steps": {"type": "quniform", "low": 1, "high": 5, "q": 1}}, "bohb")
    check_searchable({"attack.steps": {"type": "grid", "values": [1, 3]}}, "random")  # random sampling takes grids
    cfg, _ = compose_sweep([*base, "tune.time_attr=compute", "tune.scheduler.max_t=20000"])
    assert cfg["tune"]["scheduler"]["max_t"] == 20000


def test_searchers_and_schedulers_from_the_config(tmp_path):
    from ray.tune.schedulers import FIFOScheduler, HyperBandForBOHB
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.bohb import TuneBOHB
    from ray.tune.search.optuna import OptunaSearch

    from tune.schedulers import ReplayASHA, make_scheduler
    from tune.search import compose_sweep
    from tune.searchers import make_searcher
    from tune.space import param_space

    def built(*extra):
        cfg, _ = compose_sweep(["tune=demo", f"output_dir={tmp_path}", *extra])
        return cfg, make_searcher(cfg["tune"], 3), make_scheduler(cfg)

    _, (search, limit), sched = built()
    assert isinstance(search, BasicVariantGenerator) and limit is None and isinstance(sched, ReplayASHA)
    assert sched._time_attr == "epoch" and sched._max_t == 4
    cfg, (search, limit), sched = built("tune.search_alg=optuna", "tune.seed=7", "tune.time_attr=compute",
                                        "tune.scheduler.max_t=30000", "tune.scheduler.grace_period=3000")
    assert isinstance(search, OptunaSearch) and limit == 3
    assert isinstance(sched, ReplayASHA) and sched._time_attr == "compute" and sched._max_t == 30000
    # the space as TPE sees it: Tune's distributions converted by OptunaSearch
    search.set_search_properties("objective", "max", param_space(cfg["tune"]["space"]))

    def proposals(seed):  # TPE seeded by tune.seed: the same seed proposes the same points
        s = make_searcher({**cfg["tune"], "seed": seed}, 1)[0]
        s.set_search_properties("objective", "max", param_space(cfg["tune"]["space"]))
        return [s.suggest(str(i)) for i in range(3)]

    assert proposals(7) == proposals(7) != proposals(8)
    kinds = {k: type(d).__name__ for k, d in search._space.items()}
    assert kinds == {"attack.eps": "FloatDistribution", "attack.steps": "CategoricalDistribution",
                     "attack.alpha": "FloatDistribution", "method.lam": "FloatDistribution"}
    assert search._space["method.lam"].log
    _, (search, _), sched = built("tune.search_alg=bohb")
    assert isinstance(search, TuneBOHB) and isinstance(sched, HyperBandForBOHB)
    _, _, sched = built("tune.scheduler.name=fifo")
    assert isinstance(sched, FIFOScheduler)


def test_asha_replay_matches_rays_asha_scheduler():
    """tune.replay's rule against Ray's own ASHAScheduler, fed the same results trial after trial,
    with rungs on epochs and on a compute counter that grows at a different rate per trial."""
    import random

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler

    from tune.replay import AshaRule, replay_asha

    rng = random.Random(0)
    trials = []
    for i in range(30):
        steps, level = rng.choice([1, 3, 5]), rng.random()
        history, m = [], level
        for e in range(1, 10):
            m += rng.gauss(0.02, 0.05)
            history.append({"epoch": e, "compute": 100 * e * (1 + steps), "objective": m})
        trials.append({"trial_id": f"t{i:02d}", "history": history})
    for time_attr, max_t, grace in (("epoch", 9, 1), ("compute", 5400, 600), ("compute", 5400, 150)):
        ray_sched = ASHAScheduler(time_attr=time_attr, metric="objective", mode="max", max_t=max_t,
                                  grace_period=grace, reduction_factor=3)
        ray_epochs = {}
        for t in trials:
            trial = Trial("__fake", stub=True)
            ray_sched.on_trial_add(None, trial)
            ran = 0
            for h in t["history"]:
                ran += 1
                if ray_sched.on_trial_result(None, trial, dict(h)) == "STOP":
                    break
            ray_epochs[t["trial_id"]] = ran
        ours = replay_asha(trials, AshaRule(grace, 3, max_t), "objective", time_attr, max_epochs=9)
        assert ours["epochs_ran"] == ray_epochs, time_attr
        assert ours["trial_epochs"] == sum(ray_epochs.values()) < 9 * len(trials)  # it stopped some
        finals = [t["history"][8]["objective"] for t in trials if ray_epochs[t["trial_id"]] == 9]
        assert ours["full_budget_trials"] == len(finals) and ours["best"] == max(finals)


@pytest.fixture(scope="module")
def optuna_sweep(ray_local, tmp_path_factory):
    """3 TPE trials x <= 2 epochs, ASHA on compute; interrupted (SIGUSR1, as Ctrl+C) once the first
    trial finished, then restored to completion."""
    from ray.tune import Callback

    from trainer.checkpoint import save_model
    from trainer.models import build_encoder
    from tune.analyze import trial_statuses
    from tune.search import compose_sweep, run_sweep, sweep_dir

    tmp = tmp_path_factory.mktemp("tune_optuna")
    tiny = [o for o in tiny_overrides(tmp, **{"method.train.epochs": "2", "monitor.val_attack.steps": "2",
                                              "monitor.probe_steps": "30", "method.train.batch_size": "256"})
            if not o.startswith("monitor.knn_every")]
    plain = compose(tiny)
    teacher = tmp / "teacher.pt"  # random weights: the teacher stage is the same path as a trial's
    save_model(teacher, build_encoder(plain["model"], plain["data"]["stats"], with_projector=False),
               plain["model"], plain["data"]["stats"])
    # compute per epoch = 1280 train images x (1 + steps): rungs at 2560 and 7680, max_t = 2 epochs of 3 steps
    cfg, base = compose_sweep(["tune=demo", *tiny, f"teacher.checkpoint={teacher}", "tune.num_samples=3",
                               "tune.verbose=0", "tune.max_concurrent_trials=1", "tune.search_alg=optuna",
                               "tune.seed=3", "tune.time_attr=compute", "tune.scheduler.max_t=10240",
                               "tune.scheduler.grace_period=2560", "tune.scheduler.reduction_factor=3"])
    path = Path(sweep_dir(cfg))

    class Interrupt(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if os.environ.get("TUNE_TEST_INTERRUPT") == "1":
                os.environ.pop("TUNE_TEST_INTERRUPT")
                os.kill(os.getpid(), signal.SIGUSR1)

    first = _sweep_interrupted_by(Interrupt(), cfg, base)
    before = trial_statuses(path)
    second = run_sweep(cfg, base, resume="true", log=lambda m: None)
    return {"dir": path, "first": first, "second": second, "before": before, "after": trial_statuses(path)}


@pytest.mark.slow
def test_optuna_sweep_restores_its_searcher_and_is_analysed(optuna_sweep, tmp_path):
    import pickle

    path = optuna_sweep["dir"]
    assert optuna_sweep["first"]["unfinished"] > 0 or len(optuna_sweep["before"]) < 3, "not interrupted"
    assert "TERMINATED" in optuna_sweep["before"].values()
    after = optuna_sweep["after"]
    # the restored searcher went on counting: 3 samples in all, not 3 more
    assert len(after) == 3 and set(after.values()) == {"TERMINATED"}, after
    states = sorted(path.glob("searcher-state-*.pkl"))  # one per session, named by its start time
    assert len(states) == 2, states  # the interrupted session's and the restored one's
    with open(states[-1], "rb") as f:
        state = pickle.load(f)
    study = state["_ot_study"]  # OptunaSearch's own state: TPE saw every trial, before and after
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    with open(states[0], "rb") as f:  # at the interruption: what the restored searcher started from
        assert 1 <= len(pickle.load(f)["_ot_study"].trials) < 3
    meta = json.loads((path / "sweep.json").read_text())
    assert meta["search_alg"] == "optuna" and meta["time_attr"] == "compute" and meta["scheduler_max_t"] == 10240
    per_image_pass = set()  # compute = epochs x train images x (1 + that trial's PGD steps)
    for trial_dir in path.glob("trial_*"):
        rows = _history(trial_dir)
        steps = json.loads((trial_dir / "params.json").read_text())["attack.steps"]
        per_image_pass |= {r["compute"] / (r["epoch"] * (1 + steps)) for r in rows}
    assert per_image_pass == {1280}  # 5 batches of 256 digits images per epoch
    out = tmp_path / "analysis"
    proc = subprocess.run([PY, "-m", "tune.analyze", str(path), "--out", str(out), "--x", "compute"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = (out / "leaderboard.csv").read_text().splitlines()[0]
    assert header.startswith("rank,trial_id,status,epochs,asha_stopped,objective,val_clean_acc,val_robust_acc,compute")
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the committed benchmark fixture

FIXTURE = ROOT / "benchmarks" / "fixtures" / "asha_sweep.json"


def test_benchmark_fixture_is_a_full_budget_sweep():
    fx = json.loads(FIXTURE.read_text())
    assert fx["command"].startswith("python benchmarks/asha_vs_grid.py --live") and fx["wall_time_s"] > 0
    assert fx["budget"]["configurations"] == len(fx["trials"]) == 27 and fx["max_t"] == fx["budget"]["epochs"] == 9
    keys = {(t["params"]["attack.eps"], t["params"]["attack.steps"], t["params"]["method.lam"]) for t in fx["trials"]}
    assert len(keys) == 27  # the whole 3 x 3 x 3 grid
    for t in fx["trials"]:
        assert [h["epoch"] for h in t["history"]] == list(range(1, 10)) and t["status"] == "TERMINATED"
        per_epoch = {h["compute"] / (h["epoch"] * (1 + t["params"]["attack.steps"])) for h in t["history"]}
        assert len(per_epoch) == 1  # the worker's counter: the same images every epoch, x (1 + steps)
        assert all(0 <= h["val_robust_acc"] <= h["val_clean_acc"] <= 1 for h in t["history"])


def test_asha_benchmark_replays_the_fixture(tmp_path):
    import re

    out = tmp_path / "res.json"
    proc = subprocess.run([PY, "benchmarks/asha_vs_grid.py", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"asha/grid trial-epochs ratio (\d+\.\d\d), best-objective gap (-?\d+\.\d\d) points", last)
    assert m, last
    res = json.loads(out.read_text())
    fx = json.loads(FIXTURE.read_text())
    assert res["grid"]["trial_epochs"] == 243 and res["grid"]["trials"] == 27
    grid_best = max(t["history"][-1]["objective"] for t in fx["trials"])
    assert res["grid"]["best"] == grid_best
    epoch = res["asha"]["epoch"]
    assert float(m.group(1)) == pytest.approx(sum(epoch["epochs_ran"].values()) / 243, abs=0.005)
    assert float(m.group(2)) == pytest.approx(100 * (grid_best - epoch["best"]), abs=0.005)
    # the compute-aware replay gives the cheap (1-step) trials more epochs before their first rung
    assert "time_attr=compute: asha/grid compute ratio" in proc.stdout
    assert res["asha"]["compute"]["compute"] <= res["grid"]["compute"]


def test_random_vs_tpe_benchmark(tmp_path):
    import matplotlib.image as mpimg

    png, out = tmp_path / "curve.png", tmp_path / "res.json"
    proc = subprocess.run([PY, "benchmarks/search_compare.py", "--budget", "60", "--seeds", "0", "1",
                           "--png", str(png), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["curves"]) == {"random", "tpe"}
    for runs in res["curves"].values():
        assert set(runs) == {"0", "1"}
        for points in runs.values():
            spent = [p[0] for p in points]
            best = [p[1] for p in points if p[1] is not None]
            assert spent == sorted(spent) and spent[-1] >= 60 and best == sorted(best)
            assert all(b <= res["grid_best"] for b in best)
    assert mpimg.imread(png).shape[0] > 200


def test_trials_hyperband_left_paused_count_as_done_under_bohb(monkeypatch, tmp_path):
    """HyperBandForBOHB pauses the trials it stops at a rung and never resumes them: a finished BOHB sweep
    is not 'interrupted'. Under ASHA / random a PAUSED trial is unfinished work."""
    import tune.search as search

    statuses = {"a": "TERMINATED", "b": "PAUSED", "c": "PAUSED", "d": "ERROR"}
    monkeypatch.setattr(search, "trial_statuses", lambda path: statuses)
    assert search.unfinished_trials(str(tmp_path), "bohb") == 0
    assert search.unfinished_trials(str(tmp_path), "random") == 2
    statuses["e"] = "RUNNING"
    assert search.unfinished_trials(str(tmp_path), "bohb") == 1


def _sweep_interrupted_by(callback, cfg, base):
    """A new sweep whose `callback` interrupts it (armed through TUNE_TEST_INTERRUPT, cleared afterwards)."""
    from tune.search import run_sweep

    os.environ["TUNE_TEST_INTERRUPT"] = "1"
    try:
        return run_sweep(cfg, base, resume="false", callbacks=[callback], log=lambda m: None)
    finally:
        os.environ.pop("TUNE_TEST_INTERRUPT", None)
