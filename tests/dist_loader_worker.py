"""One rank of a real torch.distributed (gloo) job reading its FFCV shard (run by test_loaders).

    python tests/dist_loader_worker.py BETON RANK WORLD PORT OUT.json

The beton's labels are the sample indices, so the labels a rank receives are its shard.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    beton, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    from data_pipeline.loaders import build_loader

    loader = build_loader(beton, "eval", batch_size=5, num_threads=1, train=True, seed=11,
                          distributed=True, drop_last=False)
    epochs = {}
    for epoch in (0, 1):
        epochs[epoch] = [int(v) for b in loader for v in b["label"]]
    loader.set_epoch(0)  # resume at epoch 0: the same order again
    epochs["0_again"] = [int(v) for b in loader for v in b["label"]]
    Path(out).write_text(json.dumps({"rank": rank, "epochs": epochs, "len": len(loader)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
