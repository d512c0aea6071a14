"""Main entry point: compose + validate the Hydra config, then run the recipe on Ray Train.

    python -m trainer.run                                  # embedded default (digits, CPU, minutes)
    python -m trainer.run preset=deacl_cifar10 cluster=ray # the paper's recipe on a cluster
    python -m trainer.run --cfg                            # print the composed config and exit
    python -m trainer.run --help attack                    # the keys of one config section
    python -m trainer.run seeds=[0,1,2]                    # once per seed, mean ± std
"""
from __future__ import annotations

import json

from conf import compose
from conf.cli import CommandLine, cli_main


def run(cl: CommandLine) -> int:
    from trainer import signals

    signals.install()  # SIGINT / SIGTERM stop at a safe point (trainer/signals.py)
    cfg = compose(cl.overrides)
    if cl.show_cfg:
        print(json.dumps(cfg, indent=2))
        return 0
    from trainer.recipes import preflight, run_recipe
    from trainer.results import aa_threat_model, format_table

    preflight(cfg)
    if cfg["seeds"]:
        return run_several_seeds(cfg)
    results = run_recipe(cfg)
    print()
    print(format_table(results["table"], int(cfg["eval"]["pgd"]["steps"]), aa_threat_model(cfg["eval"])))
    print(f"\nresults: {results['run_dir']}/results.json  (csv beside it); models: "
          + ", ".join(f"{k}={v}" for k, v in results["artifacts"].items()))
    return 0


def run_several_seeds(cfg: dict) -> int:
    from trainer.seeds import format_seed_table, run_seeds

    out = run_seeds(cfg)
    print()
    if out["summary"]:
        print(format_seed_table(out["summary"], int(cfg["eval"]["pgd"]["steps"])))
    else:
        print("no evaluation to summarise (eval.protocols is empty)")
    figure = f", {out['figure']}" if out["figure"] else ""
    print(f"\nresults: {out['dir']}/results.json (csv beside it){figure}; per seed: "
          + ", ".join(f"seed {s}: {d}" for s, d in out["runs"].items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(__doc__, argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
