"""The sweep's workers on Ray: one actor per slot, each holding its CPUs and GPUs for its life.

A Ray task may land in a worker process that ran an earlier task on another GPU, and a process's
CUDA sees the GPUs it was started with for good: a kept model would stay on the old GPU while
Ray counts the new one as busy, and two tasks would share a card. So the sweep runs its tasks on
actors instead: each :class:`SweepWorker` is given its GPUs once, when Ray starts it (Ray sets
``CUDA_VISIBLE_DEVICES`` to them, so ``cuda`` is ``cuda:0`` inside), runs one task at a time and
keeps its loaded models (:mod:`analyses.sweep.task`) for the tasks that follow on the same GPU.
:class:`Pool` starts the actors the cluster has room for, hands each task to an idle actor of the
task's resource shape (one that holds the task's model first), and replaces an actor that dies.

``simulate_gpus`` is a hook for tests and benchmarks on machines without GPUs: Ray's accounting
of GPUs stays (start Ray with ``ray.init(num_gpus=N)``; each actor still holds its GPU and sees
it in ``CUDA_VISIBLE_DEVICES``) but the model runs on the CPU. Users never set it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from analyses.sweep.spec import Resources, TaskSpec
from analyses.sweep.task import TaskOutcome

TaskFn = Callable[[TaskSpec, str, int, str | None], TaskOutcome]
"""What runs one task: :func:`analyses.sweep.task.run_task` (tests wrap it to inject faults)."""


def placed_device(device: str, gpu_ids: Iterable[str], visible: str | None, simulate: bool = False) -> str:
    """The torch device a task of the sweep's ``device`` uses in a worker given ``gpu_ids`` by Ray
    (``visible``: the worker's ``CUDA_VISIBLE_DEVICES``).

    ``auto`` is ``cuda`` on a worker that holds GPUs and ``cpu`` on one that holds none (Ray
    leaves ``CUDA_VISIBLE_DEVICES`` unset there, so torch would see every GPU of the node and take
    the first, behind Ray's back). Where the node keeps every GPU visible (Ray told not to set the
    variable), ``cuda`` is the worker's own GPU by its index among the visible ones. With
    ``simulate`` the model runs on the CPU whatever the GPUs."""
    ids = [str(i) for i in gpu_ids]
    if simulate or (device == "auto" and not ids):
        return "cpu"
    if device == "cpu" or not ids:
        return device
    shown = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if shown == ids:  # Ray's normal way: only this worker's GPUs are visible, from cuda:0
        return "cuda" if device == "auto" else device
    if device in ("auto", "cuda"):
        return f"cuda:{shown.index(ids[0])}" if ids[0] in shown else f"cuda:{ids[0]}"
    return device


class SweepWorker:
    """A Ray actor that runs a sweep's tasks one at a time on the resources it was started with."""

    def __init__(self, task_fn: TaskFn, simulate_gpus: bool = False) -> None:
        import ray

        self.task_fn = task_fn
        self.simulate = simulate_gpus
        self.gpus = [str(g) for g in ray.get_gpu_ids()]

    def run(self, task: TaskSpec, key: str, keep: int, root: str | None) -> TaskOutcome:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        device = placed_device(task.device, self.gpus, visible, self.simulate)
        outcome = self.task_fn(dataclasses.replace(task, device=device), key, keep, root)
        outcome.worker.update(
            gpus=list(self.gpus),
            cuda_visible_devices=visible,
            device=device + (" (GPUs simulated)" if self.simulate and self.gpus else ""),
        )
        return outcome

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Slot:
    """One actor of the pool: its resource shape, the models its last tasks ran (newest last),
    and the call it is running (None: idle)."""

    actor: Any
    shape: Resources
    models: list[str] = field(default_factory=list)
    busy: Any = None


class Pool:
    """The sweep's actors on a Ray cluster: as many as fit what the cluster has (``cpus``, ``gpus``),
    and ``max_actors`` in all."""

    def __init__(
        self,
        ray: Any,
        task_fn: TaskFn,
        *,
        cpus: float,
        gpus: float,
        keep: int,
        max_actors: int | None = None,
        simulate_gpus: bool = False,
    ) -> None:
        self.ray = ray
        self.cpus, self.gpus = cpus, gpus
        self.keep = max(keep, 1)
        self.max_actors = max_actors
        self.simulate = simulate_gpus
        self.task_fn = task_fn
        self.slots: list[Slot] = []
        self._classes: dict[Resources, Any] = {}

    def _free(self) -> tuple[float, float]:
        cpus = self.cpus - sum(s.shape.cpus for s in self.slots)
        gpus = self.gpus - sum(s.shape.gpus or 0.0 for s in self.slots)
        return cpus, gpus

    def _can_start(self, shape: Resources) -> bool:
        if self.max_actors is not None and len(self.slots) >= self.max_actors:
            return False
        cpus, gpus = self._free()
        return shape.cpus <= cpus + 1e-9 and (shape.gpus or 0.0) <= gpus + 1e-9

    def _start(self, shape: Resources) -> Slot:
        if shape not in self._classes:
            self._classes[shape] = self.ray.remote(
                num_cpus=shape.cpus, num_gpus=shape.gpus or 0, max_restarts=0, max_concurrency=1
            )(SweepWorker)
        slot = Slot(self._classes[shape].remote(self.task_fn, self.simulate), shape)
        self.slots.append(slot)
        return slot

    def slot_for(self, shape: Resources, model: str) -> Slot | None:
        """An idle actor of ``shape`` for a task on ``model`` (one that keeps the model first), a
        new one where there is room, or None."""
        idle = [s for s in self.slots if s.busy is None and s.shape == shape]
        holding = [s for s in idle if model in s.models]
        if holding or idle:
            return (holding or idle)[0]
        return self._start(shape) if self._can_start(shape) else None

    def submit(self, slot: Slot, task: TaskSpec, key: str, keep: int) -> Any:
        """Run ``task`` on ``slot``'s actor; returns the call's reference."""
        slot.busy = slot.actor.run.remote(task, key, keep, None)
        if task.model in slot.models:
            slot.models.remove(task.model)
        slot.models = [*slot.models, task.model][-self.keep :]
        return slot.busy

    def finished(self, slot: Slot) -> None:
        slot.busy = None

    def lost(self, slot: Slot) -> None:
        """Forget an actor that died (its resources go back to the cluster)."""
        self._kill(slot)
        self.slots.remove(slot)

    def retire_idle(self, needed: Iterable[Resources]) -> int:
        """Stop the idle actors of shapes no queued task needs, so others can use their resources;
        returns how many were stopped."""
        wanted = set(needed)
        gone = [s for s in self.slots if s.busy is None and s.shape not in wanted]
        for slot in gone:
            self.lost(slot)
        return len(gone)

    def close(self) -> None:
        """Stop every actor (the sweep is over, or interrupted: the calls in flight end with it)."""
        for slot in self.slots:
            self._kill(slot)
        self.slots.clear()

    def _kill(self, slot: Slot) -> None:
        with contextlib.suppress(Exception):  # an actor already gone cannot be killed again
            self.ray.kill(slot.actor, no_restart=True)
