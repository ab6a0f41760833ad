"""A sweep file: models × analyses × settings × seeds, read and checked before anything runs.

A sweep is written in TOML (or YAML, the same keys)::

    name = "two-models"                  # optional; default: the file's stem
    models = ["smollm2-135m", "tiny-llama"]
    analyses = ["census", "sinks"]       # optional when [analyses.NAME] tables name them
    seeds = [0, 1]                       # or a count: seeds = 4 means 0, 1, 2, 3
    dtype = "float32"                    # device, bos: as `headlab run`
    # device_map = "balanced"            # spread each model over its task's GPUs (with gpus = N)
    [resources]                          # what every task asks Ray for
    cpus = 1
    gpus = 1                             # default: one GPU a task where there are GPUs; 0.5 shares one
    [analyses.census]
    set = { n_natural = 4 }              # the same for every task of census
    grid = { seq_len = [64, 128] }       # every combination of these values
    # list = [{ mode = "eager" }, { mode = "recompute" }]   # or these setting sets, one task each
    # models = [...], resources = {...}  # per analysis, instead of the top-level ones

:func:`load_spec` reads and checks a file; every problem found is reported (one line each, with
how to fix it) in one :class:`SweepSpecError`. :meth:`SweepSpec.tasks` expands it into the
:class:`TaskSpec` list, one per (model, analysis, settings, seed).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analyses import registry
from analyses.base import config_from_overrides
from analyses.manifest import sanitise, to_jsonable
from probe import zoo
from probe.errors import ConfigError, HeadlabError
from probe.tiny import TINY_BUILDERS

TOP_KEYS = (
    "name",
    "models",
    "analyses",
    "seeds",
    "dtype",
    "device",
    "device_map",
    "bos",
    "resources",
    "worker_models",
)
ANALYSIS_KEYS = ("set", "grid", "list", "models", "resources")
RESOURCE_KEYS = ("cpus", "gpus")
DTYPES = ("float32", "bfloat16", "float16")
BOS = ("default", "always", "never")


class SweepSpecError(HeadlabError):
    """A sweep file with problems; ``problems`` holds one line per problem, each with its fix."""

    def __init__(self, path: str, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"{path}: {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in the sweep file, nothing was run:\n{lines}"
            if len(self.problems) > 1
            else f"{path}: {self.problems[0]}"
        )


@dataclass(frozen=True)
class Resources:
    """What one task asks Ray for: CPUs and GPUs (fractions allowed).

    ``gpus`` None (not given in the file) means one GPU a task where the Ray cluster has GPUs and
    none where it has not; :meth:`on_cluster` settles it once the cluster is known. A device of
    ``cuda`` settles it to 1 and ``cpu`` to 0 when the file is read."""

    cpus: float = 1.0
    gpus: float | None = None

    def on_cluster(self, has_gpus: bool) -> Resources:
        """These resources with ``gpus`` settled for a cluster with (or without) GPUs."""
        if self.gpus is not None:
            return self
        return Resources(self.cpus, 1.0 if has_gpus else 0.0)


@dataclass(frozen=True)
class TaskSpec:
    """One task of a sweep: an analysis with its settings and seed on one model.

    ``settings`` are the overrides over the analysis's defaults (the seed among them when the
    analysis has one; ``seed`` is None for an analysis without a seed setting). ``index`` is the
    task's place in the sweep (stable for a given file)."""

    index: int
    model: str
    analysis: str
    settings: Mapping[str, Any]
    seed: int | None
    dtype: str
    device: str
    bos: str
    resources: Resources
    device_map: str | Mapping[str, str] | None = None  # ``auto``, ``balanced`` or module -> device

    def config(self) -> Any:
        """The analysis's typed config for this task (checked)."""
        return config_from_overrides(registry.get(self.analysis).config_cls, dict(self.settings))

    @property
    def reads_run_store(self) -> bool:
        return registry.get(self.analysis).reads_run_store

    def label(self) -> str:
        shown = {k: v for k, v in self.settings.items() if k != "seed"}
        extra = " ".join(f"{k}={json.dumps(to_jsonable(v))}" for k, v in shown.items())
        seed = "" if self.seed is None else f" seed={self.seed}"
        return f"{self.analysis} on {self.model}{seed}{(' ' + extra) if extra else ''}"


@dataclass(frozen=True)
class AnalysisPlan:
    """One analysis of the sweep: its setting sets (already expanded), models and resources."""

    name: str
    settings: tuple[Mapping[str, Any], ...]
    models: tuple[str, ...]
    resources: Resources
    has_seed: bool


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep file (see the module's docstring for its keys)."""

    name: str
    path: str
    analyses: tuple[AnalysisPlan, ...]
    seeds: tuple[int, ...]
    dtype: str = "float32"
    device: str = "auto"
    bos: str = "default"
    worker_models: int = 1
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    device_map: str | Mapping[str, str] | None = None

    def tasks(self) -> list[TaskSpec]:
        """Every task, grouped by model (so that a worker meets one model's tasks in a row) and,
        within a model, in the file's order; analyses that read the run store come last."""
        items: list[tuple[str, AnalysisPlan, Mapping[str, Any], int | None]] = []
        for plan in self.analyses:
            seeds: Sequence[int | None] = self.seeds if plan.has_seed else (None,)
            for model, settings, seed in itertools.product(plan.models, plan.settings, seeds):
                items.append((model, plan, settings, seed))
        models = list(dict.fromkeys(m for plan in self.analyses for m in plan.models))
        items.sort(key=lambda item: (item[1].name in _readers(), models.index(item[0])))
        return [
            TaskSpec(
                index=i,
                model=model,
                analysis=plan.name,
                settings={**settings, **({"seed": seed} if seed is not None else {})},
                seed=seed,
                dtype=self.dtype,
                device=self.device,
                bos=self.bos,
                resources=plan.resources,
                device_map=self.device_map,
            )
            for i, (model, plan, settings, seed) in enumerate(items)
        ]


def _readers() -> set[str]:
    return {name for name, entry in registry.ANALYSES.items() if entry.reads_run_store}


# ------------------------------------------------------------------------------------------ reading


def read_file(path: Path) -> dict[str, Any]:
    """The file's data (TOML, or YAML for ``.yaml``/``.yml``); a file that cannot be read or parsed
    raises :class:`SweepSpecError` with the parser's words."""
    where = str(path)
    if not path.is_file():
        raise SweepSpecError(where, ["the sweep file does not exist; give the path of a .toml or .yaml file"])
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SweepSpecError(where, [f"cannot be read ({err}); check its permissions and encoding"]) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SweepSpecError(where, [f"is not valid YAML ({' '.join(str(err).split())})"]) from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise SweepSpecError(
                where, [f"is not valid TOML ({err}); a .yaml or .yml file is read as YAML"]
            ) from None
    if not isinstance(data, dict):
        raise SweepSpecError(where, ["holds no table of keys; start from the example in docs/sweeps.md"])
    return data


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check the sweep file ``path``; every problem raises together (:class:`SweepSpecError`)."""
    file = Path(path).expanduser()
    return check_spec(read_file(file), str(file), default_name=sanitise(file.stem, "sweep"))


def check_spec(data: Mapping[str, Any], where: str = "sweep", default_name: str = "sweep") -> SweepSpec:
    """Check the sweep's data (the file's tables as a mapping) and return the :class:`SweepSpec`."""
    problems: list[str] = []
    problems += [
        f"unknown key {key!r}; the keys are {', '.join(TOP_KEYS)}" for key in data if key not in TOP_KEYS
    ]
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip() or sanitise(name) != name:
        problems.append(
            f"name {name!r} must be up to 48 letters, digits, '-' and '_' (it names the sweep's "
            f"state in the run store); e.g. name = {sanitise(str(name), 'my-sweep')!r}"
        )
    dtype = _choice(data, "dtype", DTYPES, "float32", problems)
    bos = _choice(data, "bos", BOS, "default", problems)
    device = data.get("device", "auto")
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        problems.append(f"device {device!r} must be auto, cpu, cuda or cuda:N")
    worker_models = data.get("worker_models", 1)
    if not _is_int(worker_models) or worker_models < 0:
        problems.append(
            f"worker_models {worker_models!r} must be an integer >= 0 (how many loaded models a worker "
            "keeps for its next tasks; 0 loads the model again for every task)"
        )
    seeds = _seeds(data.get("seeds", [0]), problems)
    models = _models(data.get("models"), "models", problems)
    resources = _resources(data.get("resources", {}), "resources", problems)
    plans = _analyses(data, models, resources, problems)
    if isinstance(device, str):
        plans = _settle_gpus(plans, device, problems)
    device_map = _device_map(data.get("device_map"), device, plans, problems)
    if not problems and not plans:
        problems.append('no analyses; add analyses = ["census", ...] or an [analyses.NAME] table')
    if problems:
        raise SweepSpecError(where, problems)
    return SweepSpec(
        name=name,
        path=where,
        analyses=tuple(plans),
        seeds=seeds,
        dtype=dtype,
        device=device,
        bos=bos,
        worker_models=int(worker_models),
        raw=to_jsonable(dict(data), "sweep"),
        device_map=device_map,
    )


def _device_map(
    value: Any, device: Any, plans: list[AnalysisPlan], problems: list[str]
) -> str | dict[str, str] | None:
    """The sweep's ``device_map`` (see docs/multi-gpu.md): ``auto``, ``balanced`` or a table of
    module -> device, checked without a model (its modules are checked when a task loads it). A map
    places every module, so the device stays ``auto``; a GPU it names must be one of the task's."""
    from probe.devicemap import DeviceMapError, parse_device_map

    if value is None:
        return None
    if not isinstance(value, (str, dict)):
        problems.append(
            f"device_map {value!r} must be auto, balanced or a table of module = device "
            '(e.g. device_map = { "model.layers.0" = 0, ... })'
        )
        return None
    try:
        parsed = parse_device_map(value, check_present=False)
    except DeviceMapError as err:
        problems.append(f"device_map: {err}")
        return None
    if device != "auto":
        problems.append(
            f"device = {device!r} with a device_map: the map places every module; leave device out (auto)"
        )
    if isinstance(parsed, dict):
        wanted = 1 + max((int(d.split(":")[1]) for d in parsed.values() if d.startswith("cuda:")), default=-1)
        for plan in plans:
            gpus = plan.resources.gpus
            if wanted and gpus is not None and gpus < wanted:
                problems.append(
                    f"analyses.{plan.name}: the device_map names cuda:{wanted - 1} but each task holds "
                    f"{gpus:g} GPU(s) (a task sees only its own, from cuda:0); set resources.gpus = {wanted}"
                )
    return parsed


def _settle_gpus(plans: list[AnalysisPlan], device: str, problems: list[str]) -> list[AnalysisPlan]:
    """The plans with the GPUs of each task settled where the device decides them: ``cuda`` asks
    one GPU a task unless the file says otherwise, ``cpu`` none; ``auto`` is settled by the
    cluster (:meth:`Resources.on_cluster`). A GPU device without GPUs, or GPUs held by CPU tasks,
    is a problem."""
    settled = []
    for plan in plans:
        gpus = plan.resources.gpus
        if device.startswith("cuda") and gpus == 0:
            problems.append(
                f"analyses.{plan.name}: device = {device!r} needs resources.gpus > 0 (Ray hides the GPUs "
                'from a task that asks for none); leave gpus out (one GPU a task), or device = "auto"'
            )
        elif device == "cpu" and gpus:
            problems.append(
                f"analyses.{plan.name}: device = 'cpu' with resources.gpus = {gpus:g} holds GPUs its tasks "
                'never use; leave gpus out, or device = "auto"'
            )
        if gpus is None and device != "auto":
            gpus = 1.0 if device.startswith("cuda") else 0.0
            plan = dataclasses.replace(plan, resources=Resources(plan.resources.cpus, gpus))
        settled.append(plan)
    return settled


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(
    data: Mapping[str, Any], key: str, choices: Sequence[str], default: str, problems: list[str]
) -> str:
    value = data.get(key, default)
    if value not in choices:
        problems.append(f"{key} {value!r} must be one of {', '.join(choices)}")
        return default
    return str(value)


def _seeds(value: Any, problems: list[str]) -> tuple[int, ...]:
    if _is_int(value) and value >= 1:
        return tuple(range(value))
    if isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value):
        if len(set(value)) != len(value):
            problems.append(f"seeds {value!r} repeat a seed; give each seed once")
        return tuple(dict.fromkeys(value))
    problems.append(
        f"seeds {value!r} must be a count (seeds = 4 means 0, 1, 2, 3) or a list of integers >= 0 "
        "(seeds = [0, 7])"
    )
    return (0,)


def known_model(name: str) -> str | None:
    """Why ``name`` cannot be a sweep's model, or None: a catalogue or tiny name, a checkpoint
    directory or a ``.gguf`` file are; hub ids are not (a task must not download)."""
    if name in zoo.known_names():
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return (
            None if (path / "config.json").is_file() else f"model {name!r} is a directory without config.json"
        )
    if path.is_file() and path.suffix == ".gguf":
        return None
    if "/" in name and not path.exists() and not name.startswith((".", "/", "~")):
        return (
            f"model {name!r} looks like a hub id; a sweep does not download: save it to a directory "
            "(save_pretrained) and name the directory"
        )
    return (
        f"model {name!r} is neither a catalogue or tiny model nor an existing checkpoint directory or "
        f".gguf file; known: {', '.join(zoo.known_names())} (`headlab models`)"
    )


def model_kind(name: str) -> str | None:
    """``language``, ``vision`` or ``vision-language`` for a catalogue or tiny name (None: a path,
    whose kind is known only once loaded)."""
    if name in zoo.CATALOGUE:
        return zoo.CATALOGUE[name].kind
    if name in TINY_BUILDERS:
        return TINY_BUILDERS[name].kind
    if name in zoo.ASSEMBLIES:
        return "vision-language"
    return None


def _models(value: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        problems.append(f'{where} {value!r} must be a list of model names or paths, e.g. ["smollm2-135m"]')
        return ()
    for name in value:
        why = known_model(name)
        if why is not None:
            problems.append(f"{where}: {why}")
    return tuple(dict.fromkeys(value))


def _resources(value: Any, where: str, problems: list[str], base: Resources | None = None) -> Resources:
    base = base or Resources()
    if not isinstance(value, Mapping):
        problems.append(f"{where} {value!r} must be a table, e.g. {{ cpus = 1, gpus = 0 }}")
        return base
    problems += [
        f"{where}: unknown key {key!r}; the keys are {', '.join(RESOURCE_KEYS)}"
        for key in value
        if key not in RESOURCE_KEYS
    ]
    cpus, gpus = value.get("cpus", base.cpus), value.get("gpus", base.gpus)
    number = (int, float)
    if not isinstance(cpus, number) or isinstance(cpus, bool) or cpus <= 0:
        problems.append(f"{where}.cpus {cpus!r} must be a number > 0 (CPUs per task)")
        cpus = base.cpus
    if gpus is not None and (not isinstance(gpus, number) or isinstance(gpus, bool) or gpus < 0):
        problems.append(
            f"{where}.gpus {gpus!r} must be a number >= 0 (GPUs per task: 1 each by default, 0.5 puts two "
            "tasks on one GPU)"
        )
        gpus = base.gpus
    return Resources(float(cpus), None if gpus is None else float(gpus))


def _analyses(
    data: Mapping[str, Any], models: tuple[str, ...], resources: Resources, problems: list[str]
) -> list[AnalysisPlan]:
    listed = data.get("analyses", [])
    tables: Mapping[str, Any] = {}
    if isinstance(listed, Mapping):
        tables, names = listed, list(listed)
    elif isinstance(listed, list) and all(isinstance(v, str) for v in listed):
        names = list(listed)
    else:
        problems.append(f'analyses {listed!r} must be a list of names (["census"]) or [analyses.NAME] tables')
        return []
    plans = []
    seen: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name not in registry.ANALYSES:
            problems.append(f"unknown analysis {name!r}; known: {', '.join(registry.ANALYSES)}")
            continue
        body = tables.get(name, {})
        if not isinstance(body, Mapping):
            problems.append(f"analyses.{name} must be a table with {', '.join(ANALYSIS_KEYS)}")
            continue
        own = registry.canonical(name)
        if own in seen:
            problems.append(f"analysis {own!r} is listed twice (as {seen[own]!r} and {name!r}); list it once")
            continue
        seen[own] = name
        plan = _analysis(own, body, models, resources, problems)
        if plan is not None:
            plans.append(plan)
    return plans


def _analysis(
    name: str, body: Mapping[str, Any], models: tuple[str, ...], resources: Resources, problems: list[str]
) -> AnalysisPlan | None:
    where = f"analyses.{name}"
    entry = registry.get(name)
    problems += [
        f"{where}: unknown key {key!r}; the keys are {', '.join(ANALYSIS_KEYS)}"
        for key in body
        if key not in ANALYSIS_KEYS
    ]
    own = _models(body.get("models"), f"{where}.models", problems) or models
    if not own:
        problems.append(f"{where} has no models; set models = [...] at the top or in [{where}]")
    for model in own:
        kind = model_kind(model)
        if kind is not None and kind not in entry.model_kinds:
            problems.append(
                f"{where}: {model} is a {kind} model and {name} runs on {' or '.join(entry.model_kinds)} "
                f"models; give [{where}] its own models = [...] (its default is {entry.default_model})"
            )
    fields = {f.name for f in dataclasses.fields(entry.config_cls) if f.init}
    has_seed = "seed" in fields
    sets = _setting_sets(body, where, problems)
    checked = []
    configs: list[tuple[Any, str]] = []
    for settings in sets:
        wrong = False
        for key, value in settings.items():
            problem = _check_setting(entry.config_cls, fields, key, value, where)
            if problem is not None:
                if problem not in problems:
                    problems.append(problem)
                wrong = True
        if wrong:
            continue
        shown = ", ".join(f"{k}={v!r}" for k, v in settings.items()) or "the defaults"
        try:
            typed = _typed(entry.config_cls, settings)
            config = config_from_overrides(entry.config_cls, typed)
        except (ConfigError, TypeError, ValueError) as err:
            problem = f"{where} with {shown}: {err}"
            if problem not in problems:
                problems.append(problem)
            continue
        twin = next((words for other, words in configs if other == config), None)
        if twin is not None:  # the same task twice: one key, two runs
            problems.append(f"{where}: {shown} gives the same config as {twin}; give each setting set once")
            continue
        configs.append((config, shown))
        checked.append(typed)
    own_resources = _resources(body.get("resources", {}), f"{where}.resources", problems, resources)
    if not checked:
        return None
    return AnalysisPlan(name, tuple(checked), own, own_resources, has_seed)


def _setting_sets(body: Mapping[str, Any], where: str, problems: list[str]) -> list[dict[str, Any]]:
    """The setting sets of one analysis: ``set`` under every combination of ``grid``, times ``list``."""
    fixed = body.get("set", {})
    grid = body.get("grid", {})
    listed = body.get("list", [{}])
    if not isinstance(fixed, Mapping):
        problems.append(f"{where}.set must be a table of settings, e.g. set = {{ seq_len = 128 }}")
        fixed = {}
    if not isinstance(grid, Mapping) or not all(isinstance(v, list) and v for v in grid.values()):
        problems.append(
            f"{where}.grid must map each setting to a non-empty list, e.g. grid = {{ seq_len = [64, 128] }}"
        )
        grid = {}
    if not isinstance(listed, list) or not listed or not all(isinstance(v, Mapping) for v in listed):
        problems.append(
            f"{where}.list must be a non-empty list of tables, e.g. list = [{{ mode = 'eager' }}]"
        )
        listed = [{}]
    if "seed" in fixed or "seed" in grid or any("seed" in item for item in listed):
        problems.append(f"{where}: give seeds with the top-level seeds = [...], not as a setting")
    clash = sorted((set(fixed) & set(grid)) | {k for item in listed for k in item if k in fixed or k in grid})
    if clash:
        problems.append(
            f"{where}: {', '.join(clash)} set in more than one of set, grid and list; give each once"
        )
    keys = list(grid)
    sets = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for item in listed:
            sets.append({**fixed, **dict(zip(keys, values, strict=True)), **item})
    return [{k: v for k, v in s.items() if k != "seed"} for s in sets]


def _check_setting(cls: type[Any], fields: set[str], key: str, value: Any, where: str) -> str | None:
    """Why ``key = value`` is not a setting of ``cls``, or None."""
    if key not in fields:
        return f"{where}: {key!r} is not a setting of {cls.__name__}; the settings are {', '.join(sorted(fields))}"
    annotation = typing.get_type_hints(cls)[key]
    if not _fits(value, annotation):
        return f"{where}: {key} = {value!r} is not of type {_type_name(annotation)}"
    return None


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a value read from TOML/YAML is of the setting's declared type (ints are floats)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(value, str) and annotation is not str and origin is not typing.Literal:
        return value.lower() == "none" and type(None) in args
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args if a is not type(None))
    if origin in (tuple, list) or annotation in (tuple, list):
        if not isinstance(value, list):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return not inner or all(_fits(v, inner[0]) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # nested types: the config's own validate() decides


def _typed(cls: type[Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with lists made tuples where the config declares a tuple, "none" made None and
    ints made floats where a float is declared (so the task's config is what the CLI would build)."""
    hints = typing.get_type_hints(cls)
    return {key: registry._from_saved(_none(value), hints[key]) for key, value in settings.items()}


def _none(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() == "none" else value


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "choice of " + ", ".join(map(repr, args))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
