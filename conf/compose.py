"""Compose the Hydra config from conf/ and validate it against the schema, before anything starts.

    compose(overrides) -> dict   # Hydra composition -> resolved dict -> schema -> paths -> rules
    validate(cfg) -> dict        # schema + rules on an already composed dict (a Tune trial's)

The dict returned is plain (what Ray workers receive), with every key of the schema present.
The schema's defaults are registered in Hydra's ConfigStore under `_schema` (root and each group;
`<group>/_schema_<name>` for methods), so YAML options only hold what they change.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from conf import schema
from conf.errors import ConfigError, from_validation_error, invalid, schema_keys, unknown_key
from conf.rules import check_rules

CONF_DIR = Path(__file__).resolve().parent
# Keys that do not change what a run computes: kept out of its identity (config_hash).
NOT_IN_HASH = ("cluster", "run_name", "output_dir", "tune")
_OPTIONAL_SECTIONS = {"study": schema.Study, "analysis": schema.Analysis}
_registered = False


def defaults_tree(model: type[BaseModel], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The schema's defaults as a Hydra node: required keys are '???' (an option must set them)."""
    node: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        tp = info.annotation
        if info.is_required():
            node[name] = defaults_tree(tp) if isinstance(tp, type) and issubclass(tp, BaseModel) else "???"
            continue
        node[name] = _plain(info.get_default(call_default_factory=True))
    return node


def _plain(value: Any) -> Any:
    """A default as Hydra can hold it: models (also inside dicts) as plain dicts."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def register_schema_defaults() -> None:
    """ConfigStore nodes every composition starts from (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    root = defaults_tree(schema.Root, skip=("method", "teacher", *_OPTIONAL_SECTIONS))
    root["teacher"] = defaults_tree(schema.Teacher, skip=("method",))
    cs.store(name="_schema", node=root)
    for name, model in schema.METHOD_SCHEMAS.items():
        cs.store(group="method", name=f"_schema_{name}", node={**defaults_tree(model), "name": name})
    # data options start from every Data key, so `+data@eval.data=<option>` can be followed by eval.data.<key>=...
    # (beton_dir: the root's data node has it; eval.data's stays null, i.e. beside data's files)
    cs.store(group="data", name="_schema",
             node={k: v for k, v in defaults_tree(schema.Data).items() if k not in ("name", "beton_dir")})
    for group, model in _OPTIONAL_SECTIONS.items():
        cs.store(group=group, name="_schema", node=defaults_tree(model))
    _registered = True


def compose_raw(overrides: list[str] | None = None, config_name: str = "config"):
    """Hydra's composition of conf/ (an unresolved DictConfig, not validated)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    register_schema_defaults()
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as e:  # e.g. `method=foo`
        group, _, value = str(e.missing_cfg_file).rpartition("/")
        options = ", ".join(sorted(o for o in (e.options or []) if not o.startswith("_"))) or f"see conf/{group}"
        raise invalid(group, value, f"no such config; allowed: {options}") from e
    except (HydraException, OmegaConfBaseException) as e:
        raise _hydra_error(e, overrides) from e


def _hydra_error(e: Exception, overrides: list[str]) -> ConfigError:
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "To append to your config" in text:
        key = m.group(1)
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), None)
        return unknown_key(key, all_keys(), _typed(value))
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if m:
        return ConfigError(f"+{m.group(1)}=... is invalid: {m.group(1)} already exists; "
                           f"set it without the +: {m.group(1)}=...")
    return ConfigError(" ".join(text.split()))


def _typed(text: str | None) -> Any:
    """An override's value as Hydra would type it (near enough for a message)."""
    import yaml

    try:
        return yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        return text


def all_keys() -> list[str]:
    return schema_keys(schema.Root)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> dict[str, Any]:
    """Compose conf/ with command-line style overrides; the validated, resolved plain dict."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    cfg = compose_raw(overrides, config_name)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = str(getattr(e, "full_key", "") or "config")
        raise ConfigError(f"{key} is missing: set {key}=... (every option of its group must set it)") from e
    except OmegaConfBaseException as e:
        raise ConfigError(" ".join(str(e).split())) from e
    return finalize(plain)


def check_schema(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The schema-validated copy of `cfg`, every default filled in (ConfigError on the first bad value)."""
    try:
        return schema.Root.model_validate(dict(cfg)).model_dump()
    except ValidationError as e:
        raise from_validation_error(e, schema.Root, dict(cfg), all_keys()) from None


def finalize(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Schema, absolute paths (Ray workers chdir), derived run name, cross-field rules."""
    cfg = check_schema(cfg)
    _absolute_paths(cfg)
    if not cfg["run_name"]:
        cfg["run_name"] = default_run_name(cfg)
    check_rules(cfg)
    return cfg


def validate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Schema + rules on a composed dict (e.g. a sweep's point); returns the validated copy."""
    out = check_schema(cfg)
    check_rules(out)
    return out


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def _absolute_paths(cfg: dict[str, Any]) -> None:
    cfg["output_dir"] = _absolute(cfg["output_dir"])
    data, cluster = cfg["data"], cfg["cluster"]
    data["beton_dir"] = _absolute(data["beton_dir"])
    if data["root"]:
        data["root"] = _absolute(data["root"])
    if not cluster["storage_path"]:
        cluster["storage_path"] = str(Path(cfg["output_dir"]) / "ray_results")
    elif "://" not in cluster["storage_path"]:
        cluster["storage_path"] = _absolute(cluster["storage_path"])
    if cfg["teacher"]["checkpoint"]:
        cfg["teacher"]["checkpoint"] = _absolute(cfg["teacher"]["checkpoint"])
    if cfg["checkpoint"]:
        cfg["checkpoint"] = _absolute(cfg["checkpoint"])
    _eval_paths(cfg)


def _eval_paths(cfg: dict[str, Any]) -> None:
    """eval.data at the encoder's input size (DeACL's adv_finetune.py: Resize(32)) with its betons beside
    data's by default; eval's files as absolute paths (Ray workers chdir)."""
    ecfg, data = cfg["eval"], cfg["data"]
    if ecfg["data"] is not None:
        ed = ecfg["data"]
        ed["resolution"] = data["resolution"]
        ed["augment"]["crop_padding"] = data["augment"]["crop_padding"]  # the weak view's pad at that size
        ed["beton_dir"] = _absolute(ed["beton_dir"]) if ed["beton_dir"] else data["beton_dir"]
        if ed["root"]:
            ed["root"] = _absolute(ed["root"])
    if ecfg["corruptions"]["root"]:
        ecfg["corruptions"]["root"] = _absolute(ecfg["corruptions"]["root"])
    surrogate = ecfg["blackbox"]["surrogate"]
    if surrogate and surrogate != "teacher":
        ecfg["blackbox"]["surrogate"] = _absolute(surrogate)


def _under_output_dir(value: Any, out: str) -> Any:
    """`value` with every path inside `out` written as `${output_dir}/...` (nested dicts and lists too)."""
    if isinstance(value, dict):
        return {k: _under_output_dir(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_under_output_dir(v, out) for v in value]
    if isinstance(value, str) and out and (value == out or value.startswith(out.rstrip("/") + "/")):
        return "${output_dir}" + value[len(out.rstrip("/")):]
    return value


# Options added after runs existed, left out of the hash while they are off, so that adding an
# evaluation does not rename (and so retrain) every earlier run: dotted key -> the sub-key whose
# null turns it off ("": the key itself).
OFF_WHEN_NULL = {"eval.data": "", "eval.corruptions": "root", "eval.blackbox": "surrogate"}


def _without_off_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(cfg)
    for dotted, switch in OFF_WHEN_NULL.items():
        *parents, leaf = dotted.split(".")
        node: Any = out
        for key in parents:
            if not isinstance(node.get(key), dict):
                break
            child = dict(node[key])  # copied on the way down: the caller's config is left as it is
            node[key] = child
            node = child
        else:
            value = node.get(leaf, 0)
            off = value is None if not switch else isinstance(value, dict) and value.get(switch) is None
            if off:
                del node[leaf]
    return out


def _hash(keep: Mapping[str, Any]) -> str:
    keep = _without_off_options(keep)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Hash of everything that changes the result: not the cluster shape, not the output location,
    nor any path derived from it (data.beton_dir's default), so a moved outputs folder is the same run."""
    out = str(cfg.get("output_dir") or "")
    return _hash({k: _under_output_dir(v, out) for k, v in cfg.items() if k not in NOT_IN_HASH})


def legacy_config_hash(cfg: Mapping[str, Any]) -> str:
    """The hash runs made before 2026-12 carry: it included paths under output_dir as they were."""
    return _hash({k: v for k, v in cfg.items() if k not in NOT_IN_HASH})


def default_run_name(cfg: Mapping[str, Any]) -> str:
    """`<method>-<data>-<config hash>`; an older run of this config under its legacy name keeps that name
    (so it resumes and is reused instead of being trained again)."""
    prefix = f"{cfg['method']['name']}-{cfg['data']['name']}-"
    name, legacy = prefix + config_hash(cfg), prefix + legacy_config_hash(cfg)
    out = Path(str(cfg.get("output_dir") or "."))
    if not (out / name).exists() and (out / legacy / "run.json").exists():
        return legacy
    return name
