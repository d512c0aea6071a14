"""The command-line skeleton every entry point shares.

    def main(argv=None) -> int:
        return cli_main(__doc__, argv, run, own_keys=("checkpoint",))

`cli_main` prints `--help` (the module doc, then the config groups, their options and the
top-level keys, all read from conf/ and the schema; `--help SECTION` lists one section's keys),
splits the entry point's own `key=value` arguments from Hydra overrides, and turns a ConfigError
into one line on stderr and exit status 2, a RunStopped (a signal, a worker group that kept dying)
into its one line and its status (128 + the signal; 1), and a Ctrl-C that arrives before the entry
point handles signals itself (trainer.signals) into one line and status 130.
"""
from __future__ import annotations

import sys
import typing
from dataclasses import dataclass, field
from typing import Callable, Sequence

import yaml
from pydantic import BaseModel

from conf import schema
from conf.compose import CONF_DIR
from conf.errors import ConfigError, RunStopped, field_type, is_model, union_members, unwrap, describe


@dataclass
class CommandLine:
    overrides: list[str]                     # Hydra overrides (key=value, group=option, +key=value)
    own: dict[str, str] = field(default_factory=dict)  # the entry point's own key=value arguments
    show_cfg: bool = False                   # --cfg: print the composed config and exit


def parse(args: Sequence[str], own_keys: Sequence[str] = ()) -> CommandLine:
    own, rest = {}, []
    for a in args:
        key, eq, value = a.lstrip("+").partition("=")
        if eq and key in own_keys:
            own[key] = value
        elif a != "--cfg":
            rest.append(a)
    return CommandLine(rest, own, "--cfg" in args)


def cli_main(doc: str | None, argv: Sequence[str] | None, body: Callable[[CommandLine], int],
             own_keys: Sequence[str] = ()) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        after = args[args.index("-h" if "-h" in args else "--help") + 1:]
        print(section_help(after[0]) if after else (doc or "").rstrip() + "\n\n" + config_help())
        return 0
    try:
        return body(parse(args, own_keys))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(str(e), file=sys.stderr, flush=True)
        return e.exit_status
    except KeyboardInterrupt:  # SIGINT before the entry point installed its handlers: nothing started yet
        print("interrupted during start-up; rerun the same command to resume", file=sys.stderr, flush=True)
        return 130


def command_line() -> str:
    """This process's command line as the user would type it again (`python -m trainer.run ...`)."""
    import shlex

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None and spec.name != "__main__" else shlex.quote(sys.argv[0])
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def groups() -> dict[str, list[str]]:
    """Config group -> its options (YAML files in conf/<group>/)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and any(d.glob("*.yaml"))}


def default_options() -> dict[str, str]:
    """Group -> the option conf/config.yaml selects."""
    out = {}
    for entry in yaml.safe_load((CONF_DIR / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            out.update({str(k): str(v) for k, v in entry.items()})
    return out


def _default_text(info) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "a section"
    return "default " + ("null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value))


def _is_section(info) -> bool:
    base, _ = unwrap(info.annotation)
    return any(is_model(m) for m in (union_members(base) or [base]))


def config_help() -> str:
    chosen = default_options()
    lines = ["Config groups (choose with group=option; options are conf/<group>/<option>.yaml):"]
    for group, options in groups().items():
        shown = [f"{o} (default)" if chosen.get(group) == o else o for o in options]
        lines.append(f"  {group:<10} {', '.join(shown)}")
    lines.append("  (method@teacher.method=<method>: DeACL's teacher)")
    lines.append("\nTop-level keys (key=value):")
    sections = []
    for name, info in schema.Root.model_fields.items():
        if _is_section(info):
            sections.append(f"  {name:<10} {info.description or ''}")
            continue
        lines.append(f"  {name:<24} {info.description or ''}; {describe(field_type(info)).removeprefix('must be ')}"
                     f"; {_default_text(info)}")
    lines.append("\nSections (their keys: --help SECTION, e.g. --help attack; the composed config: --cfg):")
    return "\n".join(lines + sections)


def _section_model(path: str) -> type | None:
    """The schema class of a dotted section path; a method name gives that method's class."""
    model: typing.Any = schema.Root
    for part in path.split("."):
        if part in schema.METHOD_SCHEMAS:
            model = schema.METHOD_SCHEMAS[part]
            continue
        info = model.model_fields.get(part)
        if info is None:
            return None
        base, _ = unwrap(info.annotation)
        members = [m for m in (union_members(base) or [base]) if is_model(m)]
        if not members:
            return None
        model = members[0] if len(members) == 1 else schema.MethodBase
    return model


def section_help(path: str) -> str:
    """Every key of one section (`attack`, `eval.linear`, `method`, or a method name: `acl`)."""
    model = _section_model(path)
    if model is None:
        sections = [n for n, i in schema.Root.model_fields.items() if _is_section(i)]
        return f"no config section {path!r}; sections: {', '.join(sections)} (and their subsections)"
    lines = [f"{path}: {(model.__doc__ or '').strip().splitlines()[0]}"]
    if model is schema.MethodBase:
        lines.append("  one per method: --help " + " | --help ".join(schema.METHOD_SCHEMAS))
    for name, info in model.model_fields.items():
        lines.append(f"  {name:<22} {info.description or ''}; "
                     f"{describe(field_type(info)).removeprefix('must be ')}; {_default_text(info)}")
    return "\n".join(lines)
