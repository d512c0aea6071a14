"""A multi-node Ray cluster on one machine (ray.cluster_utils.Cluster), for tests and rehearsals.

Each simulated node is a separate raylet with its own CPUs, so placement strategies
(STRICT_SPREAD: one worker per node), cross-node collectives (gloo over TCP), node failures and
the shared-storage requirement behave as on a real cluster, only slower.

    # run a command against a 2-node cluster (RAY_ADDRESS is set for it), then tear it down
    python -m cluster.local_cluster --nodes 2 --cpus-per-node 2 -- \\
        python -m trainer.run cluster=ray cluster.num_workers=2 cluster.cpus_per_worker=2 \\
        cluster.use_gpu=false cluster.placement_strategy=STRICT_SPREAD \\
        cluster.storage_path=$PWD/outputs/ray_results model.width=4 \\
        teacher.method.train.epochs=1 teacher.method.train.warmup_epochs=0 \\
        method.train.epochs=1 method.train.warmup_epochs=0

    # or keep it up and use it from other shells (Ctrl-C stops it)
    python -m cluster.local_cluster --nodes 3

From Python (tests): `with local_cluster(nodes=2, cpus_per_node=1) as cluster: ... cluster.address`.
Only the processes this cluster started are stopped on exit (never `ray stop`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 2, head_cpus: int = 0,
                  object_store_mb: int = 150, gpus_per_node: int = 0) -> Iterator["object"]:
    """Start a head plus `nodes` worker nodes; yield the `ray.cluster_utils.Cluster`.

    The head gets `head_cpus` CPUs (0 by default: Ray Train's controller needs none), so training
    workers land on the simulated worker nodes only.
    """
    from ray.cluster_utils import Cluster

    mem = object_store_mb * 1024 * 1024
    with socket.socket() as s:  # a free dashboard port (8265 may belong to another Ray instance)
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": head_cpus, "object_store_memory": mem,
                                      "include_dashboard": True, "dashboard_port": dashboard_port})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node, object_store_memory=mem)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, command = args[:i], args[i + 1:]
    p = argparse.ArgumentParser(prog="python -m cluster.local_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2, help="simulated worker nodes (default 2)")
    p.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs of each worker node")
    p.add_argument("--gpus-per-node", type=int, default=0, help="logical GPUs of each worker node")
    p.add_argument("--head-cpus", type=int, default=0, help="logical CPUs of the head node (default 0)")
    p.add_argument("--object-store-mb", type=int, default=150)
    opts = p.parse_args(args)
    if opts.nodes < 1:
        p.error("--nodes must be >= 1")
    with local_cluster(opts.nodes, opts.cpus_per_node, opts.head_cpus, opts.object_store_mb,
                       opts.gpus_per_node) as cluster:
        address = cluster.address
        print(f"[local_cluster] head + {opts.nodes} node(s) x {opts.cpus_per_node} CPU(s) at {address}",
              flush=True)
        if command:
            env = {**os.environ, "RAY_ADDRESS": address}
            proc = subprocess.Popen(command, env=env)
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                return proc.wait()
        print(f"[local_cluster] export RAY_ADDRESS={address}   (Ctrl-C stops the cluster)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
