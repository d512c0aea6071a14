"""Main entry point: compose + validate the Hydra config, then run the recipe on Ray Train.

    python -m trainer.run                                  # embedded default (digits, CPU, minutes)
    python -m trainer.run preset=deacl_cifar10 cluster=ray # the paper's recipe on a cluster
    python -m trainer.run --cfg                            # print the composed config and exit
"""
from __future__ import annotations

import json
import sys

from trainer.config import ConfigError, compose


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    show_cfg = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        cfg = compose(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if show_cfg:
        print(json.dumps(cfg, indent=2))
        return 0
    from trainer.recipes import format_table, run_recipe

    results = run_recipe(cfg)
    print()
    print(format_table(results["table"], int(cfg["eval"]["pgd"]["steps"])))
    print(f"\nresults: {results['run_dir']}/results.json  (csv beside it); models: "
          + ", ".join(f"{k}={v}" for k, v in results["artifacts"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
