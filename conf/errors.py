"""ConfigError and the one-line messages it carries: `key=value is invalid: what is allowed`.

`from_validation_error` turns pydantic's structured errors into that line by walking the schema to
the failing field, so the allowed values and ranges printed are the schema's own.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A configuration value is invalid; the message names key, value and what is allowed."""


class RunStopped(Exception):
    """A run stopped before finishing for a reason the user can act on (a signal, a worker group that
    kept dying): the entry points print its one-line message on stderr and exit with `exit_status`."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def invalid(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is invalid: {allowed}")


def unknown_key(key: str, known: Iterable[str], value: Any = None) -> ConfigError:
    """`key` is not in the schema: name the nearest valid key (a sibling first, then any key)."""
    parent, _, leaf = key.rpartition(".")
    known = list(known)
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)]
    close = close or difflib.get_close_matches(key, [k for k in known if k != parent], n=1, cutoff=0.85)
    hint = f"did you mean {close[0]}?" if close else "see --help for the keys"
    shown = "" if value is None or value is NO_VALUE else f"={value!r}"
    return ConfigError(f"{key}{shown} is invalid: no such config key; {hint}")


NO_VALUE = object()  # resolve(): the key is absent from the data


# ------------------------------------------------------------------------------ schema walking

def unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """(type without Annotated, its metadata: annotated_types constraints and FieldInfo hints)."""
    meta: list[Any] = []
    while typing.get_origin(tp) is typing.Annotated:
        args = typing.get_args(tp)
        tp = args[0]
        for m in args[1:]:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
            if isinstance(m, FieldInfo):
                meta.append(m)
    return tp, meta


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def union_members(tp: Any) -> list[Any] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return None


def field_type(info: FieldInfo) -> Any:
    """A field's annotation with its own constraints re-attached (pydantic strips them)."""
    return typing.Annotated[info.annotation, info] if info.metadata or info.json_schema_extra else info.annotation


class Resolved(typing.NamedTuple):
    parts: list[str]    # dotted key parts (union member tags and list indices are not key parts)
    tp: Any             # the field's annotation (None: no such key)
    value: Any          # the value found there
    parent: Any         # the section model holding the field

    @property
    def exists(self) -> bool:
        return self.tp is not None


def resolve(model: type[BaseModel], loc: tuple[Any, ...], data: Any) -> Resolved:
    """Walk `loc` (pydantic's error location) through the schema and the data."""
    tp, parts, value, parent = model, [], data, model
    i = 0
    while i < len(loc):
        el = loc[i]
        base, _ = unwrap(tp)
        members = union_members(base)
        if is_model(base):
            parent = base
            if el not in base.model_fields:
                parts.append(str(el))
                return Resolved(parts, None, value.get(el, NO_VALUE) if isinstance(value, dict) else NO_VALUE, base)
            parts.append(str(el))
            tp, value = field_type(base.model_fields[el]), value.get(el) if isinstance(value, dict) else None
        elif members is not None:
            models = [m for m in members if is_model(m)]
            tagged = [m for m in models if _literal_tag(m) == el]
            if tagged:  # a discriminated union (the methods): the tag is not a key
                tp = tagged[0]
            elif len(models) == 1 and isinstance(value, dict):  # Optional[Section]: descend, same element
                tp = models[0]
                continue
            else:
                break  # a plain union (bool | "auto"): the union itself is the field
        elif typing.get_origin(base) is list and isinstance(el, int):
            tp = typing.get_args(base)[0]
            value = value[el] if isinstance(value, list) and el < len(value) else value
        elif typing.get_origin(base) is dict:
            parts.append(str(el))
            tp, value = typing.get_args(base)[1], value.get(el) if isinstance(value, dict) else None
        else:
            break
        i += 1
    return Resolved(parts, tp, value, parent)


def _literal_tag(model: type[BaseModel]) -> Any:
    f = model.model_fields.get("name")
    args = typing.get_args(f.annotation) if f is not None and typing.get_origin(f.annotation) is typing.Literal else ()
    return args[0] if len(args) == 1 else None


# ------------------------------------------------------------------------------ allowed values

def _show(v: Any) -> str:
    return {True: "true", False: "false", None: "null"}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


def _num(v: Any) -> str:
    if isinstance(v, int) and v >= 1 << 20 and v & (v - 1) == 0:
        return f"2^{v.bit_length() - 1}"
    return str(v) if isinstance(v, int) else f"{v:g}"


def _bounds(meta: list[Any]) -> str:
    lo = hi = None
    for m in meta:
        for attr, side in (("ge", "lo"), ("gt", "lo"), ("le", "hi"), ("lt", "hi")):
            v = getattr(m, attr, None)
            if v is not None and not isinstance(m, FieldInfo):
                if side == "lo":
                    lo = (attr, v)
                else:
                    hi = (attr, v)
    if lo and hi:
        return f" in {'[' if lo[0] == 'ge' else '('}{_num(lo[1])}, {_num(hi[1])}{']' if hi[0] == 'le' else ')'}"
    if lo:
        return f" {'>=' if lo[0] == 'ge' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == 'le' else '<'} {_num(hi[1])}"
    return ""


def describe(tp: Any) -> str:
    """What a value of type `tp` may be, in words ("must be an integer >= 1", "allowed: a, b")."""
    base, meta = unwrap(tp)
    hint = next((m.json_schema_extra.get("hint") for m in meta
                 if isinstance(m, FieldInfo) and isinstance(m.json_schema_extra, dict)), None)
    text = _describe_base(base, meta)
    return f"{text} ({hint})" if hint else text


def _describe_base(base: Any, meta: list[Any]) -> str:
    members = union_members(base)
    if members is not None:
        nullable = type(None) in members
        rest = [m for m in members if m is not type(None)]
        words = [_choices(m) for m in rest]
        if all(w is not None for w in words):
            return "allowed: " + ", ".join([w for ws in words for w in ws] + (["null"] if nullable else []))
        text = " or ".join(describe(m).removeprefix("must be ") for m in rest)
        return f"must be {'null or ' if nullable else ''}{text}"
    choices = _choices(base)
    if choices is not None:
        return "allowed: " + ", ".join(choices)
    if base is int:
        return "must be an integer" + _bounds(meta)
    if base is float:
        return "must be a number" + _bounds(meta)
    if base is str:
        return "must be a string"
    if typing.get_origin(base) is list:
        item = describe(typing.get_args(base)[0]).removeprefix("must be ")
        n = next((m.min_length for m in meta if getattr(m, "min_length", None)), None)
        exact = any(getattr(m, "max_length", None) == n for m in meta)
        if n and not exact:
            return f"must be a non-empty list; each item: {item}"
        if n:
            item = item.replace("a number", "numbers").replace("an integer", "integers")
            return f"must be a list of {n} {item}"
        return f"must be a list; each item: {item}"
    if typing.get_origin(base) is dict or is_model(base):
        return "must be a section (its keys: --help SECTION)"
    return f"must be {getattr(base, '__name__', base)}"


def _choices(tp: Any) -> list[str] | None:
    base, _ = unwrap(tp)
    if base is bool:
        return ["true", "false"]
    if typing.get_origin(base) is typing.Literal:
        return [_show(v) for v in typing.get_args(base)]
    return None


# ------------------------------------------------------------------------------ pydantic -> line

def from_validation_error(err: ValidationError, model: type[BaseModel], data: Any,
                          known_keys: Iterable[str], prefix: str = "") -> ConfigError:
    """The first error of `err` as one line."""
    e = err.errors()[0]
    r = resolve(model, tuple(e["loc"]), data)
    parts, tp, value = r.parts, r.tp, r.value
    key = ".".join(([prefix] if prefix else []) + parts) or "config"
    if not r.exists or e["type"] == "extra_forbidden":
        parent = key.rpartition(".")[0]
        siblings = [f"{parent}.{k}" if parent else k for k in r.parent.model_fields]
        return unknown_key(key, [*siblings, *known_keys], value)
    if e["type"] == "missing":
        return ConfigError(f"{key} is missing: set {key}=... ({describe(tp).removeprefix('must be ')})")
    if e["type"] == "union_tag_invalid":
        tag = e["ctx"]["tag"]
        return invalid(f"{key}.name", tag, "unknown; allowed: " + e["ctx"]["expected_tags"].replace("'", ""))
    if e["type"] == "union_tag_not_found":
        return ConfigError(f"{key}.name is missing: every {parts[-1]} names its kind")
    return invalid(key, value, describe(tp))


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of `model` (method sections: the union of all methods' keys)."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append(key)
        base, _ = unwrap(info.annotation)
        members = [m for m in (union_members(base) or [base]) if is_model(m)]
        for m in members:
            out.extend(k for k in schema_keys(m, key + ".") if k not in out)
    return out
