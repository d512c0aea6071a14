"""End to end: `ray start --head` on this machine, then the documented `ray job submit` command
(docs/cluster.md, cluster/runtime_env.yaml) runs a tiny recipe to completion with token
authentication on.

The head runs with its own ports, temp dir and token (RAY_AUTH_TOKEN), so it neither finds nor
disturbs other Ray instances; teardown stops only the processes it started (SIGTERM to the
`ray start --block` process, which stops its raylet, GCS and workers) — never `ray stop`,
which would kill every Ray process on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _client_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{env.get('PATH', '')}"})
    return env


@pytest.fixture(scope="module")
def ray_head():
    token = secrets.token_hex(32)
    env = _client_env(token)
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env, nm, om = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rssl-ray-", dir="/tmp")  # short: unix socket paths
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "3", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rt_env), "--node-manager-port", str(nm),
           "--object-manager-port", str(om), "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.time()
        while True:
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True,
                                   text=True)
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.time() - t0 > 240:
                log.flush()
                raise RuntimeError("ray start --head did not come up:\n"
                                   + (Path(temp_dir) / "ray_start.log").read_text()[-3000:] + probe.stderr[-2000:])
            time.sleep(2)
        yield {"address": address, "token": token, "env": env}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of our own process group only
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_wrong_token_is_rejected(ray_head):
    env = dict(ray_head["env"], RAY_AUTH_TOKEN="0" * 64)
    out = subprocess.run([RAY, "job", "list", "--address", ray_head["address"]], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "auth" in (out.stdout + out.stderr).lower() or "401" in out.stdout + out.stderr


def documented_submit_command(address: str, overrides: list[str]) -> list[str]:
    """The command line of docs/cluster.md ("Submit a recipe"), run from the repository root."""
    return [RAY, "job", "submit", "--address", address, "--runtime-env", "cluster/runtime_env.yaml",
            "--", "python", "-m", "trainer.run", "cluster=ray", *overrides]


@pytest.mark.slow
def test_documented_job_submit_runs_a_recipe(ray_head, tmp_path):
    shared = tmp_path / "shared"  # stands in for NFS: output_dir, storage_path, betons
    overrides = tiny_overrides(shared, **{
        "method": "simclr", "recipe": "pretrain", "data.resolution": "16", "data.val_fraction": "0.75",
        "method.train.batch_size": "64", "method.train.optimizer": "sgd", "method.train.lr": "0.1",
        "cluster.num_workers": "2", "cluster.cpus_per_worker": "1", "cluster.use_gpu": "false",
        "cluster.storage_path": str(shared / "ray_results"), "cluster.max_failures": "1",
        "eval.autoattack.enabled": "false", "eval.linear.batch_size": "64"})
    cmd = documented_submit_command(ray_head["address"], overrides)
    print("$ RAY_AUTH_MODE=token " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.time()
    job = subprocess.run(cmd, cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=900)
    log = job.stdout + job.stderr
    print(f"job took {time.time() - t0:.0f}s")
    assert job.returncode == 0, log[-6000:]
    assert "succeeded" in log.lower(), log[-6000:]
    results = list((shared / "out").glob("*/results.json"))
    assert len(results) == 1, log[-4000:]
    res = json.loads(results[0].read_text())
    slf = res["evaluations"]["simclr"]
    assert 0.0 <= slf["slf_sa"] <= 1.0 and slf["slf_n_test"] > 0
    assert Path(res["artifacts"]["train"]).exists()
    assert any((shared / "ray_results").glob("*-train/checkpoint_*/state.pt"))
