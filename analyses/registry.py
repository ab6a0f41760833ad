"""One registration per analysis: everything the CLI, the demo, the dashboard and the reports need.

An analysis registers itself with :func:`register` at the end of its own module; the built-in
ones are listed in :data:`BUILTIN` and imported on first use of :data:`ANALYSES`. See
``docs/adding-an-analysis.md`` for the steps and what breaks when one is skipped.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from analyses.roles import Role
from probe import zoo
from probe.errors import ConfigError

if TYPE_CHECKING:
    from analyses.base import AnalysisResult
    from probe.loading import LoadedModel

BUILTIN: tuple[str, ...] = (
    "analyses.census",
    "analyses.sinks",
    "analyses.act",
    "analyses.retrieval",
    "analyses.duo",
    "analyses.circuits",
    "analyses.vit_heads",
    "analyses.vhd",
    "analyses.atlas",
)
"""Modules that register the built-in analyses, in the order the CLI, the demo and the dashboard
list them."""

PIECES = ("page", "report", "demo", "docs")
"""The optional pieces of a registration; leaving one out takes a written reason in ``opt_outs``."""


@dataclass(frozen=True)
class Analysis:
    """Everything headlab knows about one analysis.

    ``page`` and ``report`` name the dashboard page class and the report-section builder as
    ``"module:attribute"`` strings: the analyses layer never imports the dashboard, the dashboard
    resolves them. ``demo`` is the config the main job (``headlab demo``) runs it with, as
    settings over the defaults (``{}``: the defaults). ``docs`` is the page of ``docs/`` that defines
    it (a path relative to the repository root). A piece left ``None`` needs a reason in
    ``opt_outs`` (``{"demo": "why"}``); the registry test fails otherwise.

    ``roles`` are the head roles its ``heads`` table gives (:class:`analyses.roles.Role`: column,
    rule, threshold, paper); the head atlas joins analyses by them. ``atlas_metrics`` are the
    heads-table columns the atlas correlates across analyses (empty: the numeric columns its roles
    read). ``model_kinds`` are the model
    kinds it runs on (``LoadedModel.kind``: ``language``, ``vision``, ``vision-language``).
    ``reads_run_store`` marks an analysis that reads other runs (the atlas): its config's ``root``
    is set to the run store the CLI writes to. ``atlas_preset`` is the fast config ``headlab atlas
    --run-missing`` runs it with when it has no ``demo`` settings (None: it is not run there).
    """

    name: str
    config_cls: type[Any]
    run: Callable[[LoadedModel, Any], AnalysisResult]
    summary: Callable[[AnalysisResult], str]
    help: str
    default_model: str = zoo.DEFAULT_MODEL
    aliases: tuple[str, ...] = ()
    page: str | None = None
    report: str | None = None
    demo: Mapping[str, Any] | None = None
    docs: str | None = None
    opt_outs: Mapping[str, str] = field(default_factory=dict)
    roles: tuple[Role, ...] = ()
    atlas_metrics: tuple[str, ...] = ()
    model_kinds: tuple[str, ...] = ("language",)
    reads_run_store: bool = False
    atlas_preset: Mapping[str, Any] | None = None

    def missing(self) -> list[str]:
        """Pieces neither given nor opted out of, with a reason (empty when the entry is complete)."""
        problems = [
            f"{self.name}: no {piece} and no reason in opt_outs[{piece!r}]"
            for piece in PIECES
            if getattr(self, piece) is None and not self.opt_outs.get(piece, "").strip()
        ]
        problems += [
            f"{self.name}: opt_outs[{piece!r}] given but the {piece} is set too"
            for piece in self.opt_outs
            if piece not in PIECES or getattr(self, piece) is not None
        ]
        if not dataclasses.is_dataclass(self.config_cls):
            problems.append(f"{self.name}: config_cls {self.config_cls!r} is not a dataclass")
        if not self.help.strip():
            problems.append(f"{self.name}: no CLI help")
        return problems


_ENTRIES: dict[str, Analysis] = {}
_ALIASES: dict[str, str] = {}
_LOADED = {"builtin": False}


def register(entry: Analysis) -> Analysis:
    """Add ``entry``; a name or alias that is already taken raises :class:`ValueError`."""
    for name in (entry.name, *entry.aliases):
        if name in _ENTRIES or name in _ALIASES:
            taken = _ENTRIES.get(_ALIASES.get(name, name))
            owner = f" (by {taken.run.__module__})" if taken is not None else ""
            raise ValueError(
                f"analysis name {name!r} is already registered{owner}; give {entry.name!r} another name or alias"
            )
    taken_roles = {role.name: other.name for other in _ENTRIES.values() for role in other.roles}
    for role in entry.roles:
        if role.name in taken_roles:
            raise ValueError(
                f"role {role.name!r} of {entry.name!r} is already declared by {taken_roles[role.name]!r}; "
                "role names are unique over all analyses"
            )
    _ENTRIES[entry.name] = entry
    _ALIASES.update(dict.fromkeys(entry.aliases, entry.name))
    ordered = sorted(_ENTRIES.values(), key=_builtin_rank)  # stable: registration order within a module
    _ENTRIES.clear()
    _ENTRIES.update((e.name, e) for e in ordered)
    return entry


def _builtin_rank(entry: Analysis) -> int:
    """Position of the built-in module ``entry``'s run function lives in (others come last)."""
    module = getattr(entry.run, "__module__", "") or ""
    for rank, builtin in enumerate(BUILTIN):
        if module == builtin or module.startswith(builtin + "."):
            return rank
    return len(BUILTIN)


def _load_builtin() -> None:
    if not _LOADED["builtin"]:
        _LOADED["builtin"] = True
        for module in BUILTIN:
            importlib.import_module(module)


class _Registry(MutableMapping[str, Analysis]):
    """The registered analyses by name (aliases resolve too; iteration gives each name once).

    Assigning replaces an entry in place (tests swap a run function this way); use
    :func:`register` to add one."""

    def __getitem__(self, name: str) -> Analysis:
        _load_builtin()
        return _ENTRIES[_ALIASES.get(name, name)]

    def __iter__(self) -> Iterator[str]:
        _load_builtin()
        return iter(list(_ENTRIES))

    def __len__(self) -> int:
        _load_builtin()
        return len(_ENTRIES)

    def __setitem__(self, name: str, entry: Analysis) -> None:
        _load_builtin()
        name = _ALIASES.get(name, name)
        if name not in _ENTRIES or entry.name != name:
            raise KeyError(f"{name!r}: only a registered analysis can be replaced, by an entry of that name")
        _ENTRIES[name] = entry

    def __delitem__(self, name: str) -> None:
        raise TypeError("analyses cannot be unregistered")

    def __contains__(self, name: object) -> bool:
        _load_builtin()
        return name in _ENTRIES or name in _ALIASES


ANALYSES: MutableMapping[str, Analysis] = _Registry()


def get(name: str) -> Analysis:
    """The analysis called ``name`` (or an alias of it); an unknown name gets a one-line error."""
    if name not in ANALYSES:
        raise ConfigError(f"unknown analysis {name!r}; known: {', '.join(ANALYSES)}")
    return ANALYSES[name]


def canonical(name: str) -> str:
    """``name`` with an alias replaced by the analysis's own name (unknown names unchanged)."""
    _load_builtin()
    return _ALIASES.get(name, name)


def _from_saved(value: Any, annotation: Any) -> Any:
    """``value`` read back from JSON as ``annotation`` says: lists become tuples where a tuple is
    declared, nested dataclasses are rebuilt."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _from_saved(value, options[0]) if len(options) == 1 else value
    if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
        return config_from_saved(annotation, value)  # type: ignore[arg-type]
    if (origin is tuple or annotation is tuple) and isinstance(value, list | tuple):
        args = typing.get_args(annotation)
        inner = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else None
        return tuple(_from_saved(v, inner) if inner is not None else v for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_saved(cls: type[Any], saved: Mapping[str, Any]) -> Any:
    """Config ``cls`` as a run's manifest stored it: the typed dataclass, defaults for settings the
    run predates, settings the class no longer has left out (no validation: it is a record)."""
    hints = typing.get_type_hints(cls)
    values = {
        f.name: _from_saved(saved[f.name], hints[f.name])
        for f in dataclasses.fields(cls)
        if f.init and f.name in saved
    }
    return cls(**values)
