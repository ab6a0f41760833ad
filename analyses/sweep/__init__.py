"""Sweeps: many models × analyses × settings × seeds as Ray tasks, resumable by each task's key.

``load_spec`` reads and checks a sweep file (:mod:`analyses.sweep.spec`), ``plan`` lists its tasks
with their keys, ``run_sweep`` runs what is missing (on Ray, or ``in_process``), ``status`` reads
where a sweep stands. See docs/sweeps.md.
"""

from analyses.sweep.driver import Planned, plan, run_sweep, status, summary, sweep_runs
from analyses.sweep.spec import SweepSpec, SweepSpecError, TaskSpec, check_spec, load_spec
from analyses.sweep.state import SweepState, TaskState
from analyses.sweep.task import TaskOutcome, run_task

__all__ = [
    "Planned",
    "SweepSpec",
    "SweepSpecError",
    "SweepState",
    "TaskOutcome",
    "TaskSpec",
    "TaskState",
    "check_spec",
    "load_spec",
    "plan",
    "run_sweep",
    "run_task",
    "status",
    "summary",
    "sweep_runs",
]
