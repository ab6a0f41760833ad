"""The sweep's driver: plan the tasks, skip the done ones, hand the rest to Ray, write what comes back.

Each task is one Ray task (``ray.remote`` of :func:`analyses.sweep.task.run_task`) with its
analysis's resource request; Ray places it, runs it in a worker process and retries it
(``max_retries``: an error raised by the task, or a worker lost under it). The driver keeps no more
tasks in flight than the cluster has slots for, in the sweep's order (grouped by model, so each
worker's kept model serves the next task), and writes every result to the run store itself: the
workers need no access to it. Analyses that read the run store (the atlas) run last, on the
driver, from the runs of this sweep. ``in_process=True`` runs the same tasks in a loop here
instead, without Ray.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyses import registry, runstore
from analyses.atlas.build import atlas_analyses
from analyses.sweep.keys import code_fingerprint, model_fingerprint, task_key
from analyses.sweep.spec import Resources, SweepSpec, TaskSpec
from analyses.sweep.state import (
    STATUSES,
    SweepState,
    TaskState,
    done_runs,
    driver_alive,
    merge_status,
    read_manifest,
    sweep_dir,
    task_states,
)
from analyses.sweep.task import TaskOutcome, execute, model_for, run_task
from probe.errors import ConfigError, HeadlabError, MissingPackageError

TaskFn = Callable[[TaskSpec, str, int, str | None], TaskOutcome]
"""What runs one task: :func:`analyses.sweep.task.run_task` (tests wrap it to inject faults)."""


@dataclass
class Planned:
    """A task of the sweep with its key (None for one that reads the run store: its key depends on
    the runs the others make, so it is known only once they are done)."""

    task: TaskSpec
    key: str | None


def plan(spec: SweepSpec) -> list[Planned]:
    """Every task of ``spec`` with its key; each model's weights are fingerprinted once."""
    prints: dict[str, str] = {}
    code = code_fingerprint()
    planned = []
    for task in spec.tasks():
        if task.reads_run_store:
            planned.append(Planned(task, None))
            continue
        if task.model not in prints:
            prints[task.model] = model_fingerprint(task.model)
        key = task_key(
            task.analysis,
            task.config(),
            seed=task.seed,
            weight_sha256=prints[task.model],
            dtype=task.dtype,
            bos=task.bos,
            code=code,
        )
        planned.append(Planned(task, key))
    return planned


def _placeholder(task: TaskSpec) -> str:
    """The key a task that reads the run store goes by until its own is known."""
    return f"after-the-others-{task.index}"


def _states(planned: Sequence[Planned]) -> list[TaskState]:
    keys = [p.key or _placeholder(p.task) for p in planned]
    return task_states([p.task for p in planned], keys)


def status(spec: SweepSpec, root: str | Path | None = None) -> SweepState:
    """The sweep's state as the run store and its manifest tell it (nothing is run or changed).

    ``state.state`` is ``running`` (a driver holds the sweep now), ``finished``, ``interrupted``
    (the last driver stopped or died with tasks left), or ``not started``."""
    base = runstore.runs_root(root)
    planned = plan(spec)
    state = SweepState(base, spec, _states(planned))
    manifest = read_manifest(base, spec.name)
    alive = driver_alive(sweep_dir(base, spec.name))
    merge_status(state.tasks, manifest, done_runs(base), alive)
    if manifest is None:
        state.state = "not started"
    elif alive:
        state.state = "running"
    else:
        left = any(t.status in ("pending", "running") for t in state.tasks)
        state.state = "interrupted" if left else "finished"
    return state


# ------------------------------------------------------------------------------------------ running


class _Progress:
    """The sweep's progress bar: done / running / failed / skipped and the time left."""

    def __init__(self, state: SweepState, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.state = state
        self.bar = tqdm(
            total=total, desc=f"sweep {state.spec.name}", unit="task", disable=not enabled, file=sys.stderr
        )

    def update(self, finished: int = 0) -> None:
        c = self.state.counts()
        self.bar.set_postfix_str(
            f"done {c['done']} running {c['running']} failed {c['failed'] + c['refused']} skipped {c['skipped']}",
            refresh=False,
        )
        self.bar.update(finished)

    def close(self) -> None:
        self.bar.close()


def _record(state: SweepState, task: TaskState, outcome: TaskOutcome, started: float) -> None:
    """Write a finished task's result to the run store (or record its refusal)."""
    task.seconds = round(time.perf_counter() - started, 3)
    task.worker = dict(outcome.worker)
    task.loaded_model = outcome.loaded
    if outcome.refusal is not None:
        task.status, task.error, task.attempts = "refused", outcome.refusal, 1
        return
    assert outcome.result is not None
    made = outcome.result.notes.get("task_key")
    if made != task.key:
        task.status, task.attempts = "failed", 1
        task.error = (
            f"the worker computed task key {str(made)[:12]}… for what the driver planned as {task.key[:12]}…: "
            f"its code ({outcome.worker.get('code')}) or the model's weights differ from the driver's "
            f"({code_fingerprint()}); install the same headlab and models on every node"
        )
        return
    outcome.result.notes["sweep"] = {"name": state.spec.name, "task": task.index, "seed": task.seed}
    path = outcome.result.save(state.root)
    task.status, task.run_id, task.error = "done", path.name, None


def _finished(
    state: SweepState,
    task: TaskState,
    bar: _Progress,
    on_result: Callable[[SweepState, TaskState], None] | None,
) -> None:
    """What follows every task's end: the manifest saved, the bar moved, the caller told."""
    state.save()
    bar.update(1)
    if on_result is not None:
        on_result(state, task)


def _failed(task: TaskState, err: BaseException, attempts: int) -> None:
    cause = getattr(err, "cause", None) or err
    words = " ".join(f"{type(cause).__name__}: {cause}".split())
    task.status, task.attempts, task.error = "failed", attempts, words[:500]


def run_sweep(
    spec: SweepSpec,
    *,
    root: str | Path | None = None,
    address: str | None = None,
    max_retries: int = 2,
    max_in_flight: int | None = None,
    in_process: bool = False,
    task_fn: TaskFn = run_task,
    on_result: Callable[[SweepState, TaskState], None] | None = None,
    progress: bool = True,
) -> SweepState:
    """Run every task of ``spec`` that is not done yet; return the sweep's final state.

    A task whose complete run is in the store is skipped. A task that raises is retried up to
    ``max_retries`` times and then recorded as failed, with its error, while the others go on; a
    :class:`HeadlabError` (a refusal any attempt would meet again) is recorded at once. Ctrl-C
    (KeyboardInterrupt) cancels the tasks in flight, records the sweep as interrupted and re-raises:
    the same call later computes only what is missing. ``on_result`` is called after each task is
    recorded."""
    if max_retries < 0:
        raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
    base = runstore.check_root(root)
    planned = plan(spec)
    state = SweepState(base, spec, _states(planned))
    done = done_runs(base)
    for task in state.tasks:
        if task.key in done:
            task.status, task.run_id = "skipped", done[task.key]
    work = [p for p, t in zip(planned, state.tasks, strict=True) if t.status == "pending" and p.key]
    readers = [p for p in planned if p.key is None]
    bar = _Progress(state, len(work) + len(readers), progress)
    with state.locked():
        state.state = "running"
        state.save()
        try:
            if work:
                if in_process:
                    _run_here(state, work, task_fn, max_retries, bar, on_result)
                else:
                    _run_on_ray(state, work, task_fn, max_retries, max_in_flight, address, bar, on_result)
            for item in readers:
                _run_reader(state, item, done, bar, on_result)
        except BaseException:
            for task in state.tasks:
                if task.status == "running":
                    task.status = "pending"
            state.state = "interrupted"
            state.save()
            raise
        finally:
            bar.close()
        state.state = "finished"
        state.save()
    return state


def _run_here(
    state: SweepState,
    work: Sequence[Planned],
    task_fn: TaskFn,
    max_retries: int,
    bar: _Progress,
    on_result: Callable[[SweepState, TaskState], None] | None,
) -> None:
    for item in work:
        assert item.key is not None
        task = state.by_key[item.key]
        task.status = "running"
        bar.update()
        started = time.perf_counter()
        for attempt in range(1, max_retries + 2):
            try:
                outcome = task_fn(item.task, item.key, state.spec.worker_models, None)
            except Exception as err:
                if attempt > max_retries:
                    _failed(task, err, attempt)
                continue
            _record(state, task, outcome, started)
            break
        _finished(state, task, bar, on_result)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingPackageError(
            "ray (which runs the sweep's tasks)",
            "pip install 'ray>=2.40' (scripts/install.sh installs it); or run without Ray: headlab sweep SPEC --in-process",
        ) from None
    return ray


def _connect(ray: Any, address: str | None) -> None:
    """Start a local Ray cluster (``address`` None) or join the one at ``address``; a cluster that
    cannot be joined is a one-line error saying what to check."""
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as err:
        if address is None:
            raise HeadlabError(
                f"could not start a local Ray cluster ({' '.join(str(err).split())[:200]}); see `ray status`, "
                "or run the sweep without Ray: --in-process"
            ) from None
        raise HeadlabError(
            f"could not join the Ray cluster at {address} ({' '.join(str(err).split())[:200]}); check the "
            "address (`ray status` on the head node prints it) and that this machine has the cluster's auth "
            "token (~/.ray/auth_token or RAY_AUTH_TOKEN, as Ray's token authentication asks); on the head "
            "node itself --address auto finds it; without --address the sweep starts a cluster of its own"
        ) from None


def _slots(ray: Any, work: Sequence[Planned], max_in_flight: int | None) -> int:
    """How many tasks can run at once on the cluster; a request no node can meet is refused."""
    have = ray.cluster_resources()
    cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    shapes = {p.task.resources for p in work}
    for shape in shapes:
        if shape.cpus > cpus:
            raise ConfigError(
                f"tasks of {_who(work, shape)} ask for {shape.cpus:g} CPUs each and the Ray cluster has "
                f"{cpus:g}; lower resources.cpus in the sweep file"
            )
        if shape.gpus > gpus:
            raise ConfigError(
                f"tasks of {_who(work, shape)} ask for {shape.gpus:g} GPUs each and the Ray cluster has "
                f'{gpus:g}; set resources.gpus = 0 (and device = "cpu"), or run where there are GPUs (--address)'
            )
    if max_in_flight is not None:
        return max(1, max_in_flight)
    least = min(shapes, key=lambda r: (r.gpus, r.cpus))
    fits = int(cpus // least.cpus) if least.gpus == 0 else int(min(cpus // least.cpus, gpus // least.gpus))
    return max(1, fits)


def _who(work: Sequence[Planned], shape: Resources) -> str:
    return ", ".join(sorted({p.task.analysis for p in work if p.task.resources == shape}))


def _run_on_ray(
    state: SweepState,
    work: Sequence[Planned],
    task_fn: TaskFn,
    max_retries: int,
    max_in_flight: int | None,
    address: str | None,
    bar: _Progress,
    on_result: Callable[[SweepState, TaskState], None] | None,
) -> None:
    ray = _ray()
    if not ray.is_initialized():
        _connect(ray, address)
    slots = _slots(ray, work, max_in_flight)
    remotes: dict[Resources, Any] = {}
    queue = deque(work)
    flight: dict[Any, tuple[TaskState, float]] = {}
    try:
        while queue or flight:
            submitted = bool(queue) and len(flight) < slots
            while queue and len(flight) < slots:
                item = queue.popleft()
                assert item.key is not None
                shape = item.task.resources
                if shape not in remotes:
                    remotes[shape] = ray.remote(
                        num_cpus=shape.cpus,
                        num_gpus=shape.gpus,
                        max_retries=max_retries,
                        retry_exceptions=True,
                        max_calls=0,  # keep the worker (and its kept model) for the next task, GPUs too
                    )(task_fn)
                ref = remotes[shape].remote(item.task, item.key, state.spec.worker_models, None)
                task = state.by_key[item.key]
                task.status = "running"
                flight[ref] = (task, time.perf_counter())
            if submitted:  # the new tasks are running: say so (nothing changed otherwise)
                state.save()
                bar.update()
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=2.0)
            for ref in ready:
                task, started = flight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as err:
                    _failed(task, err, max_retries + 1)
                else:
                    _record(state, task, outcome, started)
                _finished(state, task, bar, on_result)
    except BaseException:
        for ref in flight:
            ray.cancel(ref, force=True)
        raise


def _run_reader(
    state: SweepState,
    item: Planned,
    done: Mapping[str, str],
    bar: _Progress,
    on_result: Callable[[SweepState, TaskState], None] | None,
) -> None:
    """An analysis that reads the run store (the atlas), on the driver, from this sweep's runs of
    its model: the first run of each analysis the atlas joins (in the sweep file's order). Its key
    depends on those runs, so it is known only now; the same atlas of the same runs (in ``done``,
    the store as the sweep found it) is kept rather than written again."""
    task = state.by_key[_placeholder(item.task)]
    task.status = "running"
    bar.update()
    started = time.perf_counter()
    try:
        model, loaded, _ = model_for(item.task, state.spec.worker_models)
        runs = sweep_runs(state, item.task.model, model.kind)
        config = dataclasses.replace(item.task.config(), runs=runs, root=str(state.root.resolve()))
        result = execute(registry.get(item.task.analysis), model, config)
    except HeadlabError as err:
        _record(state, task, TaskOutcome(task.key, refusal=str(err).splitlines()[0]), started)
    else:
        task.key = str(result.notes["task_key"])
        if task.key in done:
            task.status, task.run_id = "skipped", done[task.key]
        else:
            _record(state, task, TaskOutcome(task.key, result=result, loaded=loaded), started)
    _finished(state, task, bar, on_result)


def sweep_runs(state: SweepState, model: str, kind: str) -> tuple[str, ...]:
    """The runs of ``model`` an atlas of this sweep joins: for each analysis the atlas takes, the
    sweep's first complete run of it (first in the sweep file's order: its first setting set and
    seed)."""
    joins = {e.name for e in atlas_analyses(kind)}
    runs: dict[str, str] = {}
    for task in state.tasks:
        if task.model == model and task.analysis in joins and task.run_id:
            runs.setdefault(task.analysis, task.run_id)
    return tuple(runs.values())


def summary(state: SweepState) -> str:
    """The sweep's counts, the models loaded, and each failed or refused task with its error."""
    c = state.counts()
    lines = [
        f"sweep {state.spec.name}: {len(state.tasks)} tasks: "
        + ", ".join(f"{c[s]} {s}" for s in STATUSES if c[s])
        + f"; models loaded {state.models_loaded} time{'' if state.models_loaded == 1 else 's'}",
        f"manifest: {sweep_dir(state.root, state.spec.name) / 'sweep.json'}",
    ]
    for task in state.tasks:
        if task.status in ("failed", "refused"):
            lines.append(f"  {task.status}: #{task.index} {task.label}: {task.error}")
    return "\n".join(lines)
