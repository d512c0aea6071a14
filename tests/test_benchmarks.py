"""The benchmark scripts run (tiny settings, no timing asserted) and their reference step computes
the same losses as the project's, so the comparison they print stays a comparison of one algorithm."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.reference_steps import (AclLARS, TorchLARS, acl_attack, acl_nt_xent, deacl_attack, interleave,
                                       rocl_attack, rocl_nt_xent, rocl_similarity)
from trainer.attacks import PGDConfig, pgd_attack
from trainer.losses import multi_positive_nt_xent, nt_xent
from trainer.optim import LARS

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: int) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_reference_losses_match_the_project():
    """ACL's interleaved nt_xent and RoCL's pairwise_similarity + NT_xent (2 and 3 views; the 3-view
    sum is twice the mean over positives) equal the project's NT-Xent, values and gradients."""
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def grads(loss):
        return torch.autograd.grad(loss, z[:2], allow_unused=True)

    ours, ref = nt_xent(z[0], z[1], 0.5, gather=False), acl_nt_xent(interleave(z[0], z[1]), 0.5)
    assert torch.allclose(ours, ref, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads(ours), grads(ref)))
    for detach in (True, False):
        for n in (2, 3):
            ours = multi_positive_nt_xent(z[:n], 0.5, gather=False, detach_right=detach) * (n - 1)
            ref = rocl_nt_xent(rocl_similarity(torch.cat(z[:n]), 0.5, detach), n)
            assert torch.allclose(ours, ref, atol=1e-6), (detach, n)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(ours), grads(ref))), (detach, n)


@pytest.mark.parametrize("kind", ["acl", "torchlars"])
def test_reference_lars_matches_the_project(kind):
    """The benchmark's LARS (written from ACL's optimizer/lars.py and from torchlars) and the project's
    LARS configured as conf/method/acl.yaml / rocl.yaml take the same steps, the learning rate changing
    between steps (where it enters the momentum matters), 1-d and all-zero parameters included."""
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
              torch.zeros(3, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    project = {"acl": dict(eps=0.0, lr_in_momentum=True, zero_threshold=1e-15), "torchlars": {}}[kind]
    out = []
    for make in (lambda ps: LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-4, **project),
                 lambda ps: (AclLARS if kind == "acl" else TorchLARS)(ps, lr=0.5, momentum=0.9, weight_decay=1e-4)):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = make(ps)
        for step, gs in enumerate(grads):
            for group in opt.param_groups:
                group["lr"] = 0.5 / (step + 1)
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        out.append(ps)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(*out))
    assert not torch.allclose(out[0][0], params[0])


def test_reference_attacks_match_the_project():
    """DeACL's and ACL's attacks (unclipped start) and RoCL's (start clipped to [0, 1]) reach the
    engine's x_adv from the same random draw; pixels at 0 and 1 exercise the box."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    x = torch.rand(5, 3, 2, 2, dtype=torch.float64)
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    target = torch.randn(5, 3, dtype=torch.float64)
    cos = lambda xa: -torch.nn.functional.cosine_similarity(model(xa), target, dim=1)  # noqa: E731
    eps, alpha, steps = 8 / 255, 2 / 255, 3
    refs = {"deacl": (False, lambda: deacl_attack(model, x, target, eps, alpha, steps)),
            "acl": (False, lambda: acl_attack(model, lambda xa: cos(xa).sum(), x, eps, alpha, steps)),
            "rocl": (True, lambda: rocl_attack(lambda xa: cos(xa).sum(), x, eps, alpha, steps))}
    for name, (clamp, ref_fn) in refs.items():
        torch.manual_seed(3)
        ours = pgd_attack(x, cos, PGDConfig(eps=eps, alpha=alpha, steps=steps, clamp_start=clamp))
        torch.manual_seed(3)
        ref = ref_fn()
        assert torch.allclose(ours, ref, atol=1e-12, rtol=0), name
        assert (ours - x).abs().max() > alpha, name  # the attack moved
    assert all(p.grad is None for p in model.parameters())  # ACL's model.zero_grad() at the end


def test_step_throughput_script_runs(tmp_path):
    out = tmp_path / "step.json"
    stdout = _run(["benchmarks/step_throughput.py", "--width", "4", "--proj-hidden-dim", "32", "--batch", "4",
                   "--res", "16", "--steps", "1", "--rounds", "2", "--warmup", "0", "--threads", "1",
                   "--device", "cpu", "--json", str(out)], timeout=600)
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"deacl", "acl_ds", "rocl"}
    for name, row in res["methods"].items():
        assert f"{name:8s} wall project" in stdout
        for clock in ("wall", "cpu"):
            assert row[clock]["project_img_s"] > 0 and row[clock]["reference_img_s"] > 0
            assert len(row[clock]["ratios"]) == 2
    assert res["machine"]["loadavg_start"] and res["machine"]["cpu"]


def test_step_throughput_mfu_runs(tmp_path):
    """--mfu on a tiny model: every step's FLOPs, the GEMM peak, MFU and memory, and the last lines."""
    out = tmp_path / "mfu.json"
    stdout = _run(["benchmarks/step_throughput.py", "--mfu", "--profile", "--width", "4", "--proj-hidden-dim", "32",
                   "--batch", "4", "--res", "16", "--steps", "1", "--rounds", "1", "--warmup", "0", "--threads", "1",
                   "--device", "cpu", "--json", str(out)], timeout=600)
    res = json.loads(out.read_text())
    assert list(res["methods"]) == ["simclr", "deacl", "acl_ds", "rocl", "trades"]
    tail = [ln for ln in stdout.splitlines() if ln.startswith("mfu ")]
    assert [ln.split()[1] for ln in tail] == list(res["methods"])
    assert stdout.rstrip().splitlines()[-len(tail):] == tail
    for name, row in res["methods"].items():
        assert row["flops_per_step"] > 0 and 0 < row["mfu"] < 1 and row["peak_memory_mib"] > 0
        assert abs(row["mfu"] - row["flop_s"] / res["gemm_peak_flop_s"]) < 1e-9
        assert f"mfu {name} {row['mfu']:.2f}" in tail
        assert 0 < row["profile"]["dense_share"] < 1
    # the attack's passes are counted: DeACL's 5-step PGD costs more than SimCLR's two plain views
    assert res["methods"]["deacl"]["flops_per_step"] > res["methods"]["simclr"]["flops_per_step"]


def test_flop_count_of_a_known_step():
    """count_flops counts a linear layer's forward and its backward (input and weight gradients)."""
    from benchmarks.mfu import count_flops

    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(16, 64, requires_grad=True)
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 16 * 64 * 32
    # an input gradient alone (PGD's autograd.grad) is one matmul more than the forward
    assert count_flops(lambda: torch.autograd.grad(lin(x).sum(), x)) == 2 * 2 * 16 * 64 * 32


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the GPU check's whole path on CPU (tests, steps, bf16 vs fp32, JSON)."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["dry_run"] and res["cuda_tests"]["ran"] and res["cuda_tests"]["rc"] == 0
    assert set(res["bf16_vs_fp32"]) == {"deacl", "acl_ds", "rocl"}
    for row in res["bf16_vs_fp32"].values():
        assert row["clean"]["loss_rel_diff"] < 0.05 and -1 <= row["clean"]["grad_cosine"] <= 1
    eager = [k for k in res["steps"] if k.endswith("_eager")]
    assert sorted(eager) == ["bf16_channels_last_eager", "bf16_nchw_eager", "fp32_channels_last_eager", "fp32_nchw_eager"]
    for key in eager:
        for row in res["steps"][key].values():
            assert row["img_s"] > 0 and row["mfu"] > 0 and row["peak_memory_mib"] > 0
    bad = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--fast"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--fast'" in bad.stderr


@pytest.mark.slow
def test_pipeline_efficiency_script_runs(tmp_path):
    out = tmp_path / "pipe.json"
    stdout = _run(["benchmarks/pipeline_efficiency.py", "--width", "4", "--batch", "128", "--epochs", "2",
                   "--warmup-epochs", "1", "--attack-steps", "1", "--bare-steps", "1", "--threads", "1", "--knn-every", "1",
                   "--output-dir", str(tmp_path / "run"), "--json", str(out),
                   "model.proj_hidden_dim=32", "model.proj_output_dim=16"], timeout=900)
    res = json.loads(out.read_text())
    assert [e["epoch"] for e in res["raw"]] == [1, 2]
    assert [e["epoch"] for e in res["epochs"]] == [2]  # the warm-up epoch is excluded
    assert res["median"]["efficiency_wall"] > 0 and res["median"]["efficiency_cpu"] > 0
    assert res["overall_efficiency_wall"] == pytest.approx(res["epochs"][0]["efficiency_wall"])  # one kept epoch
    assert res["raw"][0]["knn"] and res["raw"][0]["knn_s"] > 0 and res["raw"][0]["checkpoint_write_s"] > 0
    assert "median: efficiency wall" in stdout


def _fake_full_budget_sweep(root, curves: dict[str, list[float]]) -> None:
    """A finished FIFO sweep folder in Tune's layout: sweep.json + trial_<id>/{params,result}.json."""
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"metric": "objective", "mode": "max", "max_t": 4, "space": {}}))
    for tid, curve in curves.items():
        d = root / f"trial_{tid}"
        d.mkdir()
        (d / "params.json").write_text("{}")
        (d / "result.json").write_text("".join(
            json.dumps({"trial_id": tid, "epoch": e + 1, "objective": m}) + "\n" for e, m in enumerate(curve)))


def test_asha_vs_grid_replay_follows_ashas_rule(tmp_path):
    # In trial-id order with rungs 1 and 2 (rf 2), each result against the median of what the rung
    # recorded before it (Ray's rule): a continues (first at each rung); b is below [0.5] at rung 1
    # -> stops after 1 epoch; c is above the median of [0.5, 0.3] and of [0.6] -> full budget; d is
    # below the rung-1 median of [0.5, 0.3, 0.6] -> stops at 1.
    _fake_full_budget_sweep(tmp_path / "sw", {"a": [0.5, 0.6, 0.7, 0.8], "b": [0.3, 0.9, 0.95, 0.99],
                                              "c": [0.6, 0.7, 0.8, 0.85], "d": [0.2, 0.3, 0.4, 0.5]})
    out = tmp_path / "res.json"
    stdout = _run(["benchmarks/asha_vs_grid.py", "--simulate", str(tmp_path / "sw"), "--reduction-factor", "2",
                   "--json", str(out)], timeout=120)
    res = json.loads(out.read_text())
    grid, asha = res["grid"], res["asha"]["epoch"]
    assert {k: grid[k] for k in ("trials", "trial_epochs", "full_budget_trials", "best")} == \
        {"trials": 4, "trial_epochs": 16, "full_budget_trials": 4, "best": 0.99}
    assert asha["rungs"] == [1, 2, 4] and "compute" not in res["asha"]  # these histories report no compute
    assert asha["trial_epochs"] == 4 + 1 + 4 + 1 and asha["full_budget_trials"] == 2
    assert asha["best"] == 0.85  # the late bloomer b is what ASHA gives up
    assert res["epoch"]["trial_epochs_ratio"] == 10 / 16
    assert stdout.splitlines()[-1] == "asha/grid trial-epochs ratio 0.62, best-objective gap 14.00 points"
