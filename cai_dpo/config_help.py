"""Help on the run config: every field with its type, default and meaning (``cai-dpo config explain``).

The meanings are the ``metadata={"help": ...}`` of the dataclass fields in :mod:`cai_dpo.config`;
defaults are those of a default :class:`~cai_dpo.config.RunConfig` (so ``curate.sampling`` shows the
curation stage's own sampling defaults, not the generic ones). From a notebook::

    from cai_dpo.config_help import explain
    print(explain("dpo"))                     # or "dpo.lora", "ppo.sampling", "dpo.beta", None for all
    print(explain("dpo", profile="tiny"))     # with the tiny profile's values where they differ
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from collections.abc import Iterator
from typing import Any

from cai_dpo.config import ConfigError, RunConfig, load_config

__all__ = ["explain", "field_help", "section_class", "section_paths"]

_INDENT = "  "


def field_help(f: dataclasses.Field) -> str:
    """The help text of a config field (empty when it has none)."""
    return str(f.metadata.get("help", "")).strip()


def section_class(hint: Any) -> type | None:
    """The config section class a field's resolved type holds: ``X``, ``X | None`` or ``list[X]`` for a
    dataclass ``X``; None for a plain value."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType, list):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and isinstance(inner[0], type) and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _sections(cls: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = section_class(hints[f.name])
        if sub is not None:
            path = f"{prefix}{f.name}"
            yield path, sub
            yield from _sections(sub, f"{path}.")


def section_paths() -> list[str]:
    """Dotted names of every config section (``policy``, ``dpo``, ``dpo.lora``, ``judge.model``, ...)."""
    return [path for path, _ in _sections(RunConfig)]


def _fmt(value: Any) -> str:
    """A value as it would be written in the YAML config (flow style): null, true, "text", [1, 2]."""

    def plain(obj: Any) -> Any:
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else str(obj)

    return json.dumps(value, ensure_ascii=False, default=plain)


def _as_section(value: Any, cls: type) -> Any:
    """``value`` when it is an instance of section ``cls``, else None (an unset optional section, a list)."""
    return value if isinstance(value, cls) else None


class _Renderer:
    """Collects the lines of :func:`explain`: one per field, its help wrapped and indented below it."""

    def __init__(self, profile: str | None, width: int):
        self.profile, self.width, self.lines = profile, width, []

    def wrap(self, text: str, pad: str) -> None:
        if text:
            self.lines += textwrap.wrap(
                text,
                width=self.width,
                initial_indent=pad,
                subsequent_indent=pad,
                break_long_words=False,
                break_on_hyphens=False,
            )

    def value_line(self, pad: str, name: str, f: dataclasses.Field, obj: Any, pobj: Any) -> None:
        """``name: type = default`` (and the profile's value where it differs), then the help."""
        value = getattr(obj, f.name)
        line = f"{pad}{name}: {f.type} = {_fmt(value)}"
        if self.profile and pobj is not None and getattr(pobj, f.name) != value:
            line += f"  [{self.profile}: {_fmt(getattr(pobj, f.name))}]"
        self.lines.append(line)
        self.wrap(field_help(f), pad + _INDENT * 2)

    def field(self, cls: type, f: dataclasses.Field, obj: Any, pobj: Any, prefix: str, depth: int) -> None:
        pad = _INDENT * depth
        sub = section_class(typing.get_type_hints(cls)[f.name])
        value = getattr(obj, f.name)
        if sub is not None and isinstance(value, sub):
            self.lines.append(f"{pad}{f.name}: ({f.type})")
            self.wrap(field_help(f), pad + _INDENT * 2)
            pvalue = _as_section(getattr(pobj, f.name), sub) if pobj is not None else None
            self.section(sub, value, pvalue, f"{prefix}{f.name}.", depth + 1)
            return
        self.value_line(pad, f.name, f, obj, pobj)
        if sub is not None:
            self.lines.append(f"{pad}{_INDENT * 2}(fields of {sub.__name__}: cai-dpo config explain {prefix}{f.name})")

    def section(self, cls: type, obj: Any, pobj: Any, prefix: str, depth: int) -> None:
        for f in dataclasses.fields(cls):
            self.field(cls, f, obj, pobj, prefix, depth)


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown config section or key '{name}'; known sections: {', '.join(section_paths())}")


def explain(section: str | None = None, *, profile: str | None = None, width: int = 100) -> str:
    """Every field of the run config, or of ``section``, with its type, default and help.

    ``section`` is a dotted section name (``dpo``, ``dpo.lora``, ``ppo.sampling``, ``judge.model``)
    or one key (``dpo.beta``); None explains everything, nested sections indented. An optional
    section that is unset by default (``judge.model``) or a list of sections (``eval.benchmarks``)
    is shown with its class's defaults when named. ``profile`` (a profile name or YAML file) adds
    ``[profile: value]`` where that profile's value differs from the default. Unknown names raise
    :class:`~cai_dpo.config.ConfigError` listing the known sections; so does a bad profile.
    """
    r = _Renderer(profile, width)
    pconf = load_config(profile) if profile else None
    cls: type = RunConfig
    obj: Any = RunConfig()
    pobj: Any = pconf
    path = ""
    header = "run config (RunConfig)"
    help_text = (RunConfig.__doc__ or "").strip().split("\n")[0]
    parts = section.strip().split(".") if section is not None else []
    if any(not part for part in parts):
        raise _unknown(section or "")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise _unknown(section or "")
        f = fields[part]
        sub = section_class(typing.get_type_hints(cls)[part])
        if sub is None:
            if i != len(parts) - 1:
                raise _unknown(section or "")
            r.value_line("", f"{path}{part}", f, obj, pobj)
            return "\n".join(r.lines)
        value = getattr(obj, part)
        pvalue = getattr(pobj, part) if pobj is not None else None
        path = f"{path}{part}."
        header = f"{path[:-1]} ({sub.__name__})"
        if not isinstance(value, sub):
            what = "each item's fields" if isinstance(value, list) else "its fields when given"
            header = f"{path[:-1]} ({f.type}, default {_fmt(value)}; {what})"
            value = sub()
        cls, obj, pobj = sub, value, _as_section(pvalue, sub)
        help_text = field_help(f)
    r.lines.append(f"{header}:")
    r.wrap(help_text, _INDENT * 2)
    if profile:
        r.lines.append(f"{_INDENT}[{profile}: ...] marks a value the profile '{profile}' sets differently")
    r.section(cls, obj, pobj, path, 1)
    return "\n".join(r.lines)
