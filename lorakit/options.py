"""Settings dataclasses as command-line options: a method declares its settings once, the CLI builds the flags.

A settings field made with :func:`option` carries its help text and argparse details; :func:`add_options` turns
the fields of several settings classes into flags (``seed_count`` -> ``--seed-count``), one flag per name whose
help joins the declarations' help texts and names every declaring class's default; :func:`from_args` builds one
class's settings from the parsed namespace, keeping the class's defaults for flags that were not given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

_NOT_SHOWN = object()


def option(default: Any = None, help: str = "", *, show_default: Any = _NOT_SHOWN, **argparse_kwargs) -> Any:
    """A settings field that is also a command-line flag.

    Args:
        default: the setting's default (immutable values only).
        help: what the setting does, without its default (the CLI adds it).
        show_default: how the help names the default when ``str(default)`` would not say it (e.g. for None).
        **argparse_kwargs: ``type``, ``choices``, ``nargs``, ``metavar``, ``action`` for ``add_argument``.
    """
    meta = {"help": help, "argparse": argparse_kwargs}
    if show_default is not _NOT_SHOWN:
        meta["show_default"] = show_default
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def option_fields(settings_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(settings_class) if "help" in f.metadata]


def _default_text(field: dataclasses.Field) -> str | None:
    shown = field.metadata.get("show_default", _NOT_SHOWN)
    if shown is not _NOT_SHOWN:
        return shown
    if field.default is None or field.default is False:
        return None
    return str(field.default)


def default_help(owners: list[tuple[str, dataclasses.Field]]) -> str:
    """``(default X)``, or ``(default: gradient X, ziplora Y)`` when the declaring classes differ."""
    texts = [(name, _default_text(f)) for name, f in owners]
    shown = [(n, t) for n, t in texts if t is not None]
    if not shown:
        return ""
    if len({t for _, t in shown}) == 1 and len(shown) == len(texts):
        return f" (default: {shown[0][1]})"
    return " (default: " + ", ".join(f"{n} {t}" for n, t in shown) + ")"


def add_options(group, settings: Iterable[tuple[str, type]], skip: Iterable[str] = ()) -> dict[str, list[str]]:
    """Add one flag per option field of the ``(owner name, settings class)`` pairs to an argparse group.

    A flag declared by several classes is added once (argparse details from the first; the help joins the
    distinct help texts and lists each owner's default).
    Every flag defaults to None so that :func:`from_args` can tell "not given" from a value. Fields named in
    ``skip`` (flags added elsewhere) are left out. Returns ``{field name: [owner names]}``.
    """
    owners: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    skip = set(skip)
    for owner, cls in settings:
        for f in option_fields(cls):
            if f.name not in skip:
                owners.setdefault(f.name, []).append((owner, f))
    for name, declared in owners.items():
        first = declared[0][1]
        kwargs = dict(first.metadata["argparse"])
        if kwargs.get("action") != "store_true":
            kwargs["default"] = None
        helps = list(dict.fromkeys(f.metadata["help"] for _, f in declared))
        group.add_argument(flag_name(name), dest=name, help="; ".join(helps) + default_help(declared), **kwargs)
    return {name: [o for o, _ in declared] for name, declared in owners.items()}


def from_args(settings_class: type, args, **overrides):
    """``settings_class`` from an argparse namespace: given flags win, the rest keep the class's defaults."""
    values = {}
    for f in dataclasses.fields(settings_class):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    values.update(overrides)
    return settings_class(**values)


def listing(entries: dict) -> str:
    """``--help`` lines ``  name  help`` of a registry's entries (each with a ``help`` attribute)."""
    width = max(map(len, entries), default=0) + 1
    return "\n".join(f"  {name:<{width}} {entry.help}" for name, entry in entries.items())
