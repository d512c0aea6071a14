"""Search algorithms (`tune.search_alg`) and the spaces each can express.

    random   Tune's BasicVariantGenerator: independent samples (grid keys: every value x num_samples)
    optuna   Ray's OptunaSearch with Optuna's TPE sampler, seeded by tune.seed
    bohb     Ray's TuneBOHB (hpbandster's BOHB, ConfigSpace) with its HyperBandForBOHB scheduler
             (tune/schedulers.py), budgets in epochs

Every searcher gets the same Tune distributions (`tune.space.param_space`), metric and mode, and
Tune saves its state in the sweep folder (`searcher-state-*.pkl`), so `Tuner.restore` continues the
search where it stopped: the model keeps what it learned from the trials before the interruption.
A model-based searcher proposes one point at a time from distributions; what it cannot express is
refused by `check_searchable` before anything starts.
"""
from __future__ import annotations

from typing import Any, Mapping

from conf import ConfigError
from tune.space import normalise_space

MODEL_BASED = ("optuna", "bohb")
_SCALAR = (bool, int, float, str)


def check_searchable(space: Mapping[str, Any], search_alg: str) -> None:
    """One line for a space key the chosen searcher cannot search (nothing for random sampling)."""
    if search_alg not in MODEL_BASED:
        return
    for key, spec in normalise_space(space).items():
        where = f"tune.space.{key}: type={spec['type']}"
        if spec["type"] == "grid":
            raise ConfigError(f"{where} cannot be searched by tune.search_alg={search_alg} (a model-based "
                              "searcher proposes one point at a time): use type=choice, or tune.search_alg=random")
        if spec["type"] == "choice":
            bad = [v for v in spec["values"] if v is not None and not isinstance(v, _SCALAR)]
            if bad:
                raise ConfigError(f"{where} value {bad[0]!r} cannot be searched by tune.search_alg={search_alg}: "
                                  "its categorical values must be numbers, strings or booleans")
        if search_alg == "bohb" and spec["type"] == "quniform":
            raise ConfigError(f"{where} cannot be searched by tune.search_alg=bohb (TuneBOHB drops the quantum): "
                              "use uniform, randint or choice")


def check_search_config(t: Mapping[str, Any]) -> None:
    """The rules the search algorithm adds: its space, and BOHB's scheduler and budget axis."""
    alg = t["search_alg"]
    check_searchable(t["space"], alg)
    if alg != "bohb":
        return
    if t["scheduler"]["name"] != "asha":
        raise ConfigError(f"tune.scheduler.name={t['scheduler']['name']!r} is invalid with tune.search_alg=bohb: "
                          "BOHB runs with its own HyperBand scheduler (allowed: asha, the default)")
    if t["time_attr"] != "epoch":
        raise ConfigError("tune.time_attr='compute' is invalid with tune.search_alg=bohb: HyperBand's smallest "
                          "budget is one unit (allowed: epoch; for compute budgets use random or optuna with ASHA)")


def make_searcher(t: Mapping[str, Any], max_concurrent: int) -> tuple[Any, int | None]:
    """(search algorithm, max_concurrent_trials for TuneConfig) for `tune.search_alg`."""
    seed = int(t["seed"])
    if t["search_alg"] == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent), None
    if t["search_alg"] == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # The sampler carries the seed (OptunaSearch ignores `seed` when given a sampler).
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed)), max_concurrent
    from ray.tune.search.bohb import TuneBOHB

    # The seed reaches ConfigSpace's random configurations; hpbandster samples its KDE with
    # numpy's global generator, so a BOHB sweep is not fully reproducible.
    return TuneBOHB(seed=seed), max_concurrent
