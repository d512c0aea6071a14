"""Search spaces: `tune.space` entries (conf/schema.py, SpaceSpec) -> checks, Tune distributions, configs.

    attack.eps:   {type: uniform, low: 4/255, high: 12/255}
    attack.alpha: {type: uniform, low: 0.15, high: 0.5, relative_to: attack.eps}   # alpha = value * eps

Keys are dotted config keys; `relative_to` makes the sampled value a multiple of another key's.
`check_space` validates the whole space before anything starts: every key exists, every spec is
well formed, and every corner of the space gives a valid config.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping

from omegaconf import OmegaConf
from pydantic import ValidationError

from conf import ConfigError, validate
from conf.errors import from_validation_error
from conf.schema import SpaceSpec

MAX_CORNERS = 512


def normalise_space(space: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every spec through the schema (SpaceSpec): every field present, types checked."""
    out = {}
    for key, spec in space.items():
        try:
            out[key] = SpaceSpec.model_validate(spec).model_dump()
        except ValidationError as e:
            raise from_validation_error(e, SpaceSpec, spec, list(SpaceSpec.model_fields),
                                        prefix=f"tune.space.{key}") from None
    return out


def parse_number(value: Any, key: str) -> float:
    """Numbers, or fractions written as strings ("8/255")."""
    if isinstance(value, bool):
        raise ConfigError(f"tune.space.{key}: {value!r} is not a number")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/", 1)
        try:
            return float(num) / float(den)
        except ValueError:
            pass
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"tune.space.{key}: {value!r} is not a number (fractions like 8/255 are allowed)") from None


def _value(v: Any, key: str) -> Any:
    return parse_number(v, key) if isinstance(v, str) and "/" in v else v


_ABSENT = object()


def select(cfg: Mapping[str, Any], key: str) -> Any:
    """The value at dotted `key` (KeyError if there is none)."""
    value = OmegaConf.select(OmegaConf.create(dict(cfg)), key, default=_ABSENT)
    if value is _ABSENT:
        raise KeyError(key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of base with the sampled keys set (values of `relative_to` specs scale their key)."""
    node = OmegaConf.create(dict(base))
    relative = []
    for key, value in params.items():
        ref = (space.get(key) or {}).get("relative_to")
        if ref:
            relative.append((key, value, ref))
        else:
            OmegaConf.update(node, key, value, merge=False)
    for key, value, ref in relative:
        OmegaConf.update(node, key, float(value) * float(OmegaConf.select(node, ref)), merge=False)
    return OmegaConf.to_container(node, resolve=False)


def extremes(key: str, spec: Mapping[str, Any]) -> list[Any]:
    """The values a spec can take at its ends (for the up-front validity check)."""
    if spec["type"] in ("choice", "grid"):
        return [_value(v, key) for v in spec["values"]]
    return [parse_number(spec["low"], key), parse_number(spec["high"], key)]


def _check_spec(key: str, spec: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    kind = spec["type"]
    if kind in ("choice", "grid"):
        if not spec["values"]:
            raise ConfigError(f"tune.space.{key}.values must be a non-empty list for type={kind}")
    else:
        for bound in ("low", "high"):
            if spec[bound] is None:
                raise ConfigError(f"tune.space.{key}.{bound} is missing (type={kind} needs low and high)")
        lo, hi = parse_number(spec["low"], key), parse_number(spec["high"], key)
        if not lo < hi:
            raise ConfigError(f"tune.space.{key}: low={lo} must be < high={hi}")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"tune.space.{key}.low={lo} must be > 0 for type=loguniform")
    for where, k in ((f"tune.space.{key}", key), (f"tune.space.{key}.relative_to={spec['relative_to']!r}",
                                                  spec["relative_to"])):
        if k is None:
            continue
        try:
            select(cfg, k)
        except KeyError:
            raise ConfigError(f"{where}: no such config key (python -m trainer.run --cfg lists them)") from None


def check_space(space: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Every key exists, every spec is well formed, and every corner of the space validates."""
    if not space:
        raise ConfigError("tune.space is empty: nothing to search")
    space = normalise_space(space)
    for key, spec in space.items():
        _check_spec(key, spec, cfg)
    keys = list(space)
    ends = [extremes(k, space[k]) for k in keys]
    if math.prod(len(e) for e in ends) <= MAX_CORNERS:
        corners = itertools.product(*ends)
    else:  # too many: one key at a time, the others at their first extreme
        corners = (tuple(v if j == i else ends[j][0] for j in range(len(keys)))
                   for i in range(len(keys)) for v in ends[i])
    for corner in corners:
        params = dict(zip(keys, corner))
        try:
            validate(apply_params(cfg, params, space))
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(f"tune.space: the point {{{shown}}} gives an invalid config: {e}") from None


def param_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's distributions for `tune.space`."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in normalise_space(space).items():
        kind = spec["type"]
        if kind in ("choice", "grid"):
            values = [_value(v, key) for v in spec["values"]]
            out[key] = tune.grid_search(values) if kind == "grid" else tune.choice(values)
            continue
        lo, hi = parse_number(spec["low"], key), parse_number(spec["high"], key)
        if kind == "uniform":
            out[key] = tune.uniform(lo, hi)
        elif kind == "loguniform":
            out[key] = tune.loguniform(lo, hi)
        elif kind == "quniform":
            out[key] = tune.quniform(lo, hi, parse_number(spec["q"] if spec["q"] is not None else 1, key))
        else:  # randint, both ends included
            out[key] = tune.randint(int(lo), int(hi) + 1)
    return out
