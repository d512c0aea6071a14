"""Main entry point: compose + validate the Hydra config, then run the recipe on Ray Train.

    python -m trainer.run                                  # embedded default (digits, CPU, minutes)
    python -m trainer.run preset=deacl_cifar10 cluster=ray # the paper's recipe on a cluster
    python -m trainer.run --cfg                            # print the composed config and exit
"""
from __future__ import annotations

import json
import sys

from trainer.config import ConfigError, compose, split_cli


def main(argv: list[str] | None = None) -> int:
    cli = split_cli(argv, __doc__)
    if cli is None:
        return 0
    args, show_cfg = cli
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
