"""The sweep's driver: plan the tasks, skip the done ones, hand the rest to Ray, write what comes back.

Each task runs on one of the sweep's Ray workers (:mod:`analyses.sweep.workers`): actors started
with the analysis's resource request, as many as the cluster has room for, each holding its CPUs
and GPUs for its life, so a worker's kept model stays on its own GPU and no two tasks share a GPU
unless the file asks (``gpus = 0.5``). The driver hands the tasks out in the sweep's order
(grouped by model, to a worker that keeps the task's model first), runs a task again
(``max_retries``) when it raises or its worker dies under it, and writes every result to the run
store itself: the workers need no access to it. Analyses that read the run store (the atlas) run
last, on the driver, from the runs of this sweep. ``in_process=True`` runs the same tasks in a
loop here instead, without Ray.
"""

from __future__ import annotations

import dataclasses
import math
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
from analyses.sweep.workers import Pool, Slot, TaskFn
from probe.errors import ConfigError, HeadlabError, MissingPackageError


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
    task.worker = {**outcome.worker, "load_s": round(outcome.load_s, 3), "run_s": round(outcome.run_s, 3)}
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
    simulate_gpus: bool = False,
) -> SweepState:
    """Run every task of ``spec`` that is not done yet; return the sweep's final state.

    A task whose complete run is in the store is skipped. A task that raises is retried up to
    ``max_retries`` times and then recorded as failed, with its error, while the others go on; a
    :class:`HeadlabError` (a refusal any attempt would meet again) is recorded at once. Ctrl-C
    (KeyboardInterrupt) cancels the tasks in flight, records the sweep as interrupted and re-raises:
    the same call later computes only what is missing. ``on_result`` is called after each task is
    recorded.

    ``simulate_gpus`` is for tests and benchmarks without GPUs (a cluster started with
    ``ray.init(num_gpus=N)``): each task still holds its GPUs in Ray's accounting, but its model
    runs on the CPU (:mod:`analyses.sweep.workers`). The CLI never sets it."""
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
                    _run_on_ray(
                        state,
                        work,
                        task_fn,
                        max_retries,
                        max_in_flight,
                        address,
                        bar,
                        on_result,
                        simulate_gpus,
                    )
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
        why = " ".join(str(err).split())[:200]
        if address is None:
            raise HeadlabError(
                f"could not start a local Ray cluster ({why}); see `ray status`, "
                "or run the sweep without Ray: --in-process"
            ) from None
        raise HeadlabError(
            f"could not join the Ray cluster at {address} ({why}); check the "
            "address (`ray status` on the head node prints it) and that this machine has the cluster's auth "
            "token (~/.ray/auth_token or RAY_AUTH_TOKEN, as Ray's token authentication asks); on the head "
            "node itself --address auto finds it; without --address the sweep starts a cluster of its own"
        ) from None


def _shapes(work: Sequence[Planned], cpus: float, gpus: float) -> dict[int, Resources]:
    """Each task's resources on this cluster (GPUs not given: one a task where there are GPUs); a
    request no node can meet, or a ``cuda:N`` a task cannot see, is refused before any task."""
    shapes = {p.task.index: p.task.resources.on_cluster(gpus > 0) for p in work}
    for shape in set(shapes.values()):
        who = ", ".join(sorted({p.task.analysis for p in work if shapes[p.task.index] == shape}))
        if shape.cpus > cpus:
            raise ConfigError(
                f"tasks of {who} ask for {shape.cpus:g} CPUs each and the Ray cluster has "
                f"{cpus:g}; lower resources.cpus in the sweep file"
            )
        if (shape.gpus or 0.0) > gpus:
            raise ConfigError(
                f"tasks of {who} ask for {shape.gpus:g} GPUs each and the Ray cluster has "
                f'{gpus:g}; set resources.gpus = 0 (and device = "cpu"), or run where there are GPUs (--address)'
            )
    for p in work:
        device, held = p.task.device, math.ceil(shapes[p.task.index].gpus or 0.0)
        if device.startswith("cuda:") and int(device[5:]) >= held:
            raise ConfigError(
                f"device = {device!r}: a task on Ray sees only the GPUs it holds, from cuda:0 (tasks of "
                f'{p.task.analysis} hold {held}); use device = "cuda", or --in-process to pick a GPU here'
            )
    return shapes


Queued = tuple[Planned, int, float | None]
"""A task waiting for a worker: its plan, which attempt comes next, when its first attempt began."""


def _dispatch(
    pool: Pool,
    queue: deque[Queued],
    flight: dict[Any, tuple[Slot, Queued]],
    shapes: Mapping[int, Resources],
    state: SweepState,
) -> bool:
    """Hand queued tasks to idle workers in the sweep's order (a task whose shape has no worker
    free waits, and those behind it of other shapes go on); idle workers of shapes no queued task
    needs are stopped so that the others can use their resources. Whether anything was handed out."""
    submitted = False
    for _ in range(2):
        wanted = {shapes[item.task.index] for item, _, _ in queue}
        blocked: set[Resources] = set()
        waiting: deque[Queued] = deque()
        while queue:
            entry = queue.popleft()
            item, attempt, began = entry
            shape = shapes[item.task.index]
            slot = None if shape in blocked else pool.slot_for(shape, item.task.model)
            if slot is None:
                blocked.add(shape)
                waiting.append(entry)
                if blocked >= wanted:
                    break
                continue
            assert item.key is not None
            ref = pool.submit(slot, item.task, item.key, state.spec.worker_models)
            flight[ref] = (slot, (item, attempt, time.perf_counter() if began is None else began))
            state.by_key[item.key].status = "running"
            submitted = True
        waiting.extend(queue)
        queue.clear()
        queue.extend(waiting)
        if not blocked or not pool.retire_idle(shapes[item.task.index] for item, _, _ in queue):
            break
    return submitted


def _run_on_ray(
    state: SweepState,
    work: Sequence[Planned],
    task_fn: TaskFn,
    max_retries: int,
    max_in_flight: int | None,
    address: str | None,
    bar: _Progress,
    on_result: Callable[[SweepState, TaskState], None] | None,
    simulate_gpus: bool = False,
) -> None:
    ray = _ray()
    if not ray.is_initialized():
        _connect(ray, address)
    have = ray.cluster_resources()
    cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    shapes = _shapes(work, cpus, gpus)
    pool = Pool(
        ray,
        task_fn,
        cpus=cpus,
        gpus=gpus,
        keep=state.spec.worker_models,
        max_actors=None if max_in_flight is None else max(1, max_in_flight),
        simulate_gpus=simulate_gpus,
    )
    queue: deque[Queued] = deque((item, 1, None) for item in work)
    flight: dict[Any, tuple[Slot, Queued]] = {}
    try:
        while queue or flight:
            if _dispatch(pool, queue, flight, shapes, state):  # the new tasks are running: say so
                state.save()
                bar.update()
            if not flight:
                raise HeadlabError(f"no Ray worker could be started for {len(queue)} waiting task(s)")
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=2.0)
            for ref in ready:
                slot, (item, attempt, began) = flight.pop(ref)
                assert item.key is not None and began is not None
                task = state.by_key[item.key]
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayActorError as err:  # the worker died under the task
                    pool.lost(slot)
                    error: BaseException = err
                except ray.exceptions.RayError as err:  # the task raised
                    pool.finished(slot)
                    error = err
                else:
                    pool.finished(slot)
                    _record(state, task, outcome, began)
                    task.attempts = max(task.attempts, attempt)
                    _finished(state, task, bar, on_result)
                    continue
                if attempt <= max_retries:
                    queue.appendleft((item, attempt + 1, began))  # next, on another worker if it died
                    continue
                _failed(task, error, attempt)
                _finished(state, task, bar, on_result)
    finally:
        pool.close()  # the sweep is over or interrupted: the workers (and calls in flight) end


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
