"""What exists, generated from the code so it cannot drift: the methods (``opd methods``) and every config
key with its type, default and help (``opd config --defaults``, ``docs/config.md``)."""

from __future__ import annotations

import importlib
import json
import re
import types
import typing
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import TEACHER_SPECS, Config
from .methods import METHODS, preset

REQUIRED = "(required)"


@dataclass
class Key:
    path: str  # dotted, e.g. "objective.credit.gamma"
    kind: str  # "float", "auto | fp32 | bf16", ...
    default: str  # as YAML writes it, or REQUIRED
    help: str


@dataclass
class Section:
    path: str  # "" for the top level; "teacher (kind: server)" for a teacher kind
    doc: str  # the section's docstring, first paragraph
    keys: list[Key]


def method_summary(name: str) -> tuple[str, str, dict]:
    """``(one-line definition, the rest of the docstring, preset values)`` of a named method."""
    doc = (importlib.import_module(f".methods.{name}", "opdkit").__doc__ or "").strip()
    paragraph, _, rest = doc.partition("\n\n")
    first = re.split(r"(?<=\.) (?=[A-Z`])", " ".join(paragraph.split()), maxsplit=1)[0]
    return first, rest.strip(), preset(name)


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        out += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]
    return out


def preset_text(values: dict) -> str:
    """``support=sampled divergence=reverse_kl credit.gamma=0.0`` (the ``--set`` spelling)."""
    return " ".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in _flat(values))


def _kind(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_kind(a) for a in args if a is not type(None)]
        return " | ".join(named) + (" | null" if type(None) in args else "")
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(_kind(a) for a in args if a is not Ellipsis)}]"
    if origin is typing.Annotated:
        return _kind(args[0])
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return REQUIRED
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value) if not isinstance(value, str) else value


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())


def _submodel(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def sections(model: type[BaseModel] = Config, path: str = "", title: str | None = None) -> list[Section]:
    """Every section of the config tree, depth first, its own keys before its subsections."""
    keys, nested = [], []
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] != "kind")  # a teacher's kind first
    for name, field in fields:
        dotted = f"{path}{name}"
        if model is Config and name == "teacher":
            nested += [s for kind, spec in TEACHER_SPECS.items()
                       for s in sections(spec, "teacher.", f"teacher (kind: {kind})")]
            continue
        sub = _submodel(field.annotation)
        if sub is not None:
            nested += sections(sub, f"{dotted}.")
            continue
        keys.append(Key(dotted, _kind(field.annotation), _default(field), " ".join((field.description or "").split())))
    own = Section(title if title is not None else path.rstrip("."), _doc(model) if path or title else "", keys)
    return [own, *nested]


def defaults_yaml() -> str:
    """Every key with its default as YAML, its type and help as comments (``opd config --defaults``)."""
    lines = ["# Every opdkit config key: default, type and help (opd config --defaults). Keys marked",
             "# (required) have no default. teacher takes one of four kinds (local, server, chat, self); each is listed."]
    for section in sections():
        depth = section.path.count(".") + 1 if section.path else 0
        if section.path:
            lines += ["", f"{'  ' * (depth - 1)}# --- {section.path}: {section.doc}" if section.doc else "",
                      f"{'  ' * (depth - 1)}{section.path.split('.')[-1].split(' ')[0]}:"]
        for key in section.keys:
            name = key.path.split(".")[-1]
            comment = f"  # {key.kind}" + (f". {key.help}" if key.help else "")
            lines.append(f"{'  ' * depth}{name}: {key.default}{comment}")
    return "\n".join(line for line in lines if line != "") + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_markdown() -> str:
    """``docs/config.md``: one table per section."""
    out = ["# Config reference", "",
           "Generated from `opdkit.config` by `opd config --defaults --markdown > docs/config.md`; a test fails "
           "when it drifts. Override any key on the command line with `--set key=value`.", ""]
    for section in sections():
        out += [f"## `{section.path or 'top level'}`", ""]
        if section.doc:
            out += [section.doc, ""]
        if section.keys:
            out += ["| key | type | default | help |", "|---|---|---|---|"]
            out += [f"| `{k.path.split('.', 1)[1] if section.path.startswith('teacher (') else k.path}` | "
                    f"{_cell(k.kind)} | {_cell(k.default) if k.default else ''} | {_cell(k.help)} |" for k in section.keys]
            out.append("")
    return "\n".join(out)


def methods_table() -> list[tuple[str, str, str]]:
    """``(name, one-line definition, preset)`` of every method, in the registry's order."""
    rows = []
    for name in METHODS:
        line, _, values = method_summary(name)
        rows.append((name, line, preset_text(values)))
    return rows
