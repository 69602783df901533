"""Run configuration files: every option of a command in one YAML file, checked before any work.

``atlasdgd train --print-config`` writes a complete file (each option with its default and help);
``--config FILE`` reads one back, refusing unknown keys and values of the wrong type; flags given on
the command line win over the file; the values a run used are saved next to its output
(``run-config.yaml``) so it can be repeated exactly. Keys are the long flags without the dashes,
with ``_`` for ``-`` (``--label-key`` -> ``label_key``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from atlasdgd.errors import InputError

SAVED_NAME = "run-config.yaml"
# options that say how to run, not what to compute: never in a file
META = {"config", "print_config", "json", "quiet", "verbose", "log_file", "overwrite", "help"}


@dataclass(frozen=True)
class Option:
    name: str
    default: object
    kind: str  # flag | int | float | str | list
    choices: tuple | None
    help: str


def options_of(parser: argparse.ArgumentParser) -> list[Option]:
    """The file-settable options of one (sub)command's parser (optional arguments only)."""
    out = []
    for a in parser._actions:
        # required options (--out) stay on the command line: argparse checks them before a file is read
        if not a.option_strings or a.required or a.dest in META or a.dest == argparse.SUPPRESS:
            continue
        if isinstance(a, argparse._StoreFalseAction):  # the --no-x of a flag x: a file says "x: false"
            continue
        if isinstance(a, argparse._StoreTrueAction):
            kind = "flag"
        elif isinstance(a, argparse._AppendAction):
            kind = "list"
        elif a.type in (int, float):
            kind = a.type.__name__
        else:
            kind = "str"
        out.append(Option(a.dest, a.default, kind, tuple(a.choices) if a.choices else None,
                          " ".join((a.help or "").split()) % {"default": a.default} if a.help else ""))
    return out


def template(command: str, options: list[Option]) -> str:
    """A complete configuration file: every option at its default, with its help as a comment."""
    import yaml

    lines = [f"# atlasdgd {command} configuration: every option at its default. Use with --config FILE;",
             "# flags on the command line override values here. Keys are the long flags with _ for -."]
    for o in options:
        if o.help:
            lines.append(f"# {o.help}" + (f" (one of: {', '.join(map(str, o.choices))})" if o.choices else ""))
        lines.append(yaml.safe_dump({o.name: o.default}, default_flow_style=True, sort_keys=False).strip()
                     .removeprefix("{").removesuffix("}"))
    return "\n".join(lines) + "\n"


def load(path: str | Path, options: list[Option]) -> dict:
    """The file's values, checked: a mapping of known options to values of the right type."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config {str(path)!r} does not exist: write one with --print-config > {p.name}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"--config {str(path)!r} is not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise InputError(f"--config {str(path)!r} must be a mapping of option: value, got {type(raw).__name__}")
    known = {o.name: o for o in options}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise InputError(f"--config {str(path)!r}: unknown option(s) {unknown}; valid are: {', '.join(sorted(known))}")
    return {k: _checked(known[k], v, path) for k, v in raw.items()}


def _checked(o: Option, value, path) -> object:
    def wrong(expected: str):
        return InputError(f"--config {str(path)!r}: {o.name} must be {expected}, got {value!r}")

    if value is None:
        return None
    if o.kind == "flag":
        if not isinstance(value, bool):
            raise wrong("true or false")
    elif o.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
    elif o.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        value = float(value)
    elif o.kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise wrong("a list of values")
        value = [str(v) for v in value]
    elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise wrong("a string")
    else:
        value = str(value)
    if o.choices and value not in o.choices:
        raise wrong(f"one of {list(o.choices)}")
    return value


def dump(values: dict) -> str:
    """The values a run used, as a file ``--config`` reads back."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False)
