"""The analysis registry: every analysis is registered whole, and everything built from it finds it."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pandas as pd
import pytest

import dashboard
from analyses import registry, runstore
from analyses.base import config_from_overrides
from analyses.registry import ANALYSES, Analysis, config_from_saved
from analyses.runstore import to_jsonable
from dashboard.core.page import AnalysisPage, MultiAnalysisPage
from dashboard.registry import pages, resolve, section_builder
from probe import zoo
from probe.errors import ConfigError
from tests.conftest import fixed_code_revision

DASHBOARD = Path(dashboard.__file__).parent
ROOT = DASHBOARD.parent
SHARED_DASHBOARD_FOLDERS = {"core", "pages", "sections"}


def test_every_registration_is_complete() -> None:
    problems = [p for entry in ANALYSES.values() for p in entry.missing()]
    assert problems == []


@pytest.mark.parametrize("name", list(ANALYSES))
def test_each_piece_resolves_to_what_it_claims(name: str) -> None:
    entry = ANALYSES[name]
    assert entry.name == name and callable(entry.run) and callable(entry.summary)
    if entry.page is not None:
        page = resolve(entry.page)
        assert isinstance(page, type) and issubclass(page, AnalysisPage | MultiAnalysisPage)
        assert name in page.shown_analyses(), f"{entry.page} does not show {name} runs"
    if entry.report is not None:
        assert callable(resolve(entry.report))
        assert section_builder(name) is resolve(entry.report)
    for alias in entry.aliases:
        assert ANALYSES[alias] is entry and registry.canonical(alias) == name


@pytest.mark.parametrize("name", list(ANALYSES))
def test_configs_round_trip_through_a_manifest(name: str) -> None:
    entry = ANALYSES[name]
    for settings in ({}, dict(entry.demo or {})):
        config = config_from_overrides(entry.config_cls, settings)  # also validates the demo settings
        assert config_from_saved(entry.config_cls, to_jsonable(config)) == config


def test_a_saved_config_reads_back_typed_with_defaults_for_what_it_predates() -> None:
    cls = ANALYSES["retrieval"].config_cls
    saved = to_jsonable(cls(lengths=(300,), depths=(0.0, 1.0)))
    saved.pop("threshold")
    saved["a_setting_since_removed"] = 3
    config = config_from_saved(cls, saved)
    assert config.lengths == (300,) and config.depths == (0.0, 1.0)
    assert config.threshold == cls().threshold


def test_every_registering_module_is_builtin() -> None:
    root = Path(registry.__file__).parent
    registering = set()
    for path in root.rglob("*.py"):
        if path.name != "registry.py" and "register(" in path.read_text():
            parts = path.relative_to(root.parent).with_suffix("").parts
            registering.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    listed = set(registry.BUILTIN)
    unlisted = [m for m in registering if not any(m == b or m.startswith(b + ".") for b in listed)]
    assert unlisted == [], f"add {unlisted} to analyses.registry.BUILTIN"
    assert all(any(m == b or m.startswith(b + ".") for m in registering) for b in listed)


@pytest.mark.parametrize("name", list(ANALYSES))
def test_each_analysis_has_its_docs_page(name: str) -> None:
    entry = ANALYSES[name]
    if entry.docs is None:  # a written opt-out (checked by test_every_registration_is_complete)
        assert entry.opt_outs.get("docs")
        return
    page = Path(registry.__file__).resolve().parent.parent / entry.docs
    assert page.is_file(), f"{name}: {entry.docs} does not exist"
    assert page.read_text().startswith("# ")


def test_every_analysis_has_a_behaviour_digest_case() -> None:
    spec = importlib.util.spec_from_file_location("digest", ROOT / "scripts" / "behaviour_digest.py")
    assert spec is not None and spec.loader is not None
    digest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digest)
    covered = {analysis for analysis, _model, _settings in digest.CASES}
    assert covered == set(ANALYSES), "add a case to scripts/behaviour_digest.py"
    for analysis, _model, settings in digest.CASES:
        config_from_overrides(ANALYSES[analysis].config_cls, settings)  # the settings still exist


def test_default_models_are_known_to_the_zoo() -> None:
    known = {row["name"].split()[0] for row in zoo.catalogue_rows()}
    for entry in ANALYSES.values():
        assert entry.default_model in known, f"{entry.name}: default model {entry.default_model!r}"


def test_every_dashboard_folder_belongs_to_a_registration() -> None:
    folders = {
        info.name
        for info in pkgutil.iter_modules([str(DASHBOARD)])
        if info.ispkg and info.name not in SHARED_DASHBOARD_FOLDERS
    }
    referenced = {
        ref.split(":")[0].split(".")[1]
        for entry in ANALYSES.values()
        for ref in (entry.page, entry.report)
        if ref is not None
    }
    assert folders == referenced
    for folder in folders:
        module = importlib.import_module(f"dashboard.{folder}")
        assert module.__doc__, f"dashboard/{folder}/__init__.py has no docstring"


def test_the_dashboard_has_one_page_per_registered_page() -> None:
    classes = pages()
    assert classes[0].__name__ == "HomePage"
    assert len(set(classes)) == len(classes)
    assert set(classes[1:]) == {resolve(e.page) for e in ANALYSES.values() if e.page is not None}


def test_a_missing_piece_without_a_reason_is_reported() -> None:
    entry = ANALYSES["census"]
    bare = dataclasses.replace(entry, page=None, report=None, demo=None)
    assert bare.missing() == [
        "census: no page and no reason in opt_outs['page']",
        "census: no report and no reason in opt_outs['report']",
        "census: no demo and no reason in opt_outs['demo']",
    ]
    excused = dataclasses.replace(bare, opt_outs={"page": "x", "report": "y", "demo": "z"})
    assert dataclasses.replace(entry, docs=None).missing() == [
        "census: no docs and no reason in opt_outs['docs']"
    ]
    assert excused.missing() == []
    contradictory = dataclasses.replace(entry, opt_outs={"page": "it has one"})
    assert contradictory.missing() == ["census: opt_outs['page'] given but the page is set too"]
    assert dataclasses.replace(entry, help=" ").missing() == ["census: no CLI help"]


def test_names_and_aliases_are_unique() -> None:
    entry = ANALYSES["census"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(entry)
    with pytest.raises(ValueError, match="'colored_objects' is already registered"):
        registry.register(dataclasses.replace(entry, name="census-2", aliases=("colored_objects",)))
    assert "census-2" not in ANALYSES


def test_an_alias_finds_its_analysis_runs(tmp_path: Path) -> None:
    heads = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "score": [0.5, 0.25]})
    with fixed_code_revision():
        path = runstore.write_run(
            tmp_path,
            analysis="colored-objects",
            model_info={"name": "fake-model", "n_layers": 1, "n_heads": 2},
            config=None,
            tables={"heads": heads},
        )
    assert runstore.resolve_run("latest:colored_objects", tmp_path) == path
    assert [s.path for s in runstore.list_runs(tmp_path, analysis="colored_objects")] == [path]


def test_unknown_names_get_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown analysis 'nope'; known: census, sinks"):
        registry.get("nope")
    with pytest.raises(KeyError, match="only a registered analysis can be replaced"):
        ANALYSES["nope"] = ANALYSES["census"]


def test_builtin_order_is_the_order_everything_lists() -> None:
    ranks = [registry._builtin_rank(entry) for entry in ANALYSES.values()]
    assert ranks == sorted(ranks) and max(ranks) < len(registry.BUILTIN)
    assert set(ranks) == set(range(len(registry.BUILTIN)))  # every built-in module registers something
    assert all(isinstance(entry, Analysis) for entry in ANALYSES.values())
