"""One task: load (or reuse) the model, run the analysis, hand the result back. The same function
runs a sweep's task inside a Ray worker and ``headlab run`` in its own process.

Model reuse: a worker process keeps the last ``keep`` models it loaded (keyed by name, device,
dtype, BOS policy and device map) in :data:`_MODELS`, so the next task on the same model skips the load. The
sweep hands tasks out grouped by model and keeps no more of them in flight than there are worker
slots, so each worker meets one model's tasks in a row. Tasks never change a model they run on:
every intervention restores the weights bit for bit when its block ends (docs/interventions.md).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from analyses import registry
from analyses.base import AnalysisResult
from analyses.registry import Analysis
from analyses.sweep.keys import code_fingerprint, task_key
from analyses.sweep.spec import TaskSpec
from probe.errors import HeadlabError
from probe.loading import LoadedModel

_MODELS: OrderedDict[tuple[str, str, str, str, str | None], LoadedModel] = OrderedDict()
"""The models this process keeps for its next tasks, oldest first."""


@dataclass
class TaskOutcome:
    """What a task hands back to the driver: its result, or the refusal that ended it.

    ``refusal`` is a :class:`probe.errors.HeadlabError`'s message: an error that would recur on
    every attempt (a setting the model cannot take, a context too long), so it is not retried.
    ``loaded`` says whether this task loaded its model (False: a worker's kept model was reused)."""

    key: str
    result: AnalysisResult | None = None
    refusal: str | None = None
    loaded: bool = False
    load_s: float = 0.0
    run_s: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)


def execute(entry: Analysis, model: LoadedModel, config: Any, root: str | None = None) -> AnalysisResult:
    """Run ``entry`` on ``model`` with ``config``: what ``headlab run`` and a sweep task both do.

    An analysis that reads the run store (the atlas) reads ``root`` unless its config names one.
    The result's notes carry the task key (:func:`analyses.sweep.keys.task_key`)."""
    if entry.reads_run_store and not getattr(config, "root", "") and root is not None:
        config = dataclasses.replace(config, root=str(root))
    result = entry.run(model, config)
    describe = model.describe()
    result.notes["task_key"] = task_key(
        entry.name,
        result.config,
        seed=getattr(config, "seed", None),
        weight_sha256=str(describe.get("weight_sha256")),
        dtype=str(describe.get("dtype", "")).removeprefix("torch."),
        bos=str(getattr(getattr(model, "bos", None), "mode", "default")),
        code=code_fingerprint(),
    )
    return result


def model_for(task: TaskSpec, keep: int) -> tuple[LoadedModel, bool, float]:
    """The task's model, from this process's kept models or loaded; whether it was loaded, and how
    long that took. ``keep`` = 0 keeps nothing (a fresh load every task)."""
    from probe import load_model

    spread = json.dumps(task.device_map, sort_keys=True) if task.device_map is not None else None
    slot = (task.model, task.device, task.dtype, task.bos, spread)
    if slot in _MODELS:
        _MODELS.move_to_end(slot)
        return _MODELS[slot], False, 0.0
    while _MODELS and len(_MODELS) >= max(keep, 1):
        _MODELS.popitem(last=False)  # the oldest first: free it before loading the next
        _free_memory()
    t0 = time.perf_counter()
    model = load_model(
        task.model,
        # a map places every module (on the GPUs Ray gave the worker, from cuda:0)
        device="auto" if task.device_map is not None else task.device,
        dtype=task.dtype,
        bos=task.bos,  # type: ignore[arg-type]
        device_map=task.device_map,
    )
    if keep > 0:
        _MODELS[slot] = model
    return model, True, time.perf_counter() - t0


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def run_task(task: TaskSpec, key: str, keep: int = 1, root: str | None = None) -> TaskOutcome:
    """Run one task and return its outcome. A :class:`HeadlabError` (a refusal that any attempt
    would meet again) comes back as ``refusal``; any other error is raised, for Ray to retry."""
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "threads": _match_threads()}
    try:
        model, loaded, load_s = model_for(task, keep)
        entry = registry.get(task.analysis)
        t0 = time.perf_counter()
        result = execute(entry, model, task.config(), root)
    except HeadlabError as err:
        return TaskOutcome(key, refusal=str(err).splitlines()[0], worker=worker)
    run_s = time.perf_counter() - t0
    worker["code"] = code_fingerprint()
    return TaskOutcome(key, result=result, loaded=loaded, load_s=load_s, run_s=run_s, worker=worker)


def _match_threads() -> int:
    """Use as many torch threads as the task has CPUs. Ray sets ``OMP_NUM_THREADS`` to the task's
    CPUs for each task, but torch reads it once, when first imported: a worker kept from a task of
    another size would run with that task's threads."""
    import torch

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) >= 1 and torch.get_num_threads() != int(wanted):
        torch.set_num_threads(int(wanted))
    return torch.get_num_threads()


def forget_models() -> None:
    """Drop this process's kept models (tests; a long-lived worker between sweeps)."""
    _MODELS.clear()
    _free_memory()
