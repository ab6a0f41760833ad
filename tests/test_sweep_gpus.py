"""Sweeps on GPUs, on Ray's simulated GPUs (``ray.init(num_gpus=2)`` on this CPU machine, the
sweep's ``simulate_gpus`` hook running the models on the CPU): one task per GPU by default, as many
at once as there are GPUs, each concurrent task on its own GPU, two on one GPU only when the file
asks (``gpus = 0.5``), a worker's kept model reused only on its own GPU, the results equal to the
loop's, and a worker killed mid-task: its task is run again, nothing finished runs twice. One Ray
start serves the module."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray

from analyses import runstore
from analyses import sweep as sweeps
from analyses.sweep import driver
from analyses.sweep.spec import Resources, TaskSpec
from analyses.sweep.workers import placed_device
from probe.errors import ConfigError

CENSUS = {"n_natural": 2, "n_repeated": 2, "seq_len": 16, "repeat_len": 4, "batch_size": 2, "n_examples": 1}
GPUS = 2


def spec_of(**top: Any) -> sweeps.SweepSpec:
    data = {"name": "gpus", "models": ["tiny-llama"], "analyses": {"census": {"set": CENSUS}}, **top}
    return sweeps.check_spec(data)


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, num_gpus=GPUS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def recording(marks: Path, hold: int = 0, stall: int | None = None, real: bool = True):
    """A task function that writes, per attempt, where and when it ran (pid, Ray's GPU ids,
    CUDA_VISIBLE_DEVICES, the device it was given, start and end, whether it loaded its model),
    then the real task. The first ``hold`` tasks wait for each other (up to 30 s), so that they
    are seen running at once; task ``stall`` sleeps on its first attempt (to be killed). Without
    ``real`` no model is loaded: each task comes back refused, having only shown where it ran."""

    def task_fn(task: TaskSpec, key: str, keep: int, root: str | None) -> sweeps.TaskOutcome:
        import ray

        marks.mkdir(parents=True, exist_ok=True)
        attempt = len(list(marks.glob(f"start-{task.index}-*"))) + 1
        start = time.time()
        (marks / f"start-{task.index}-{attempt}").write_text(str(os.getpid()))
        if task.index < hold:
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and len([m for m in marks.glob("start-*") if int(m.name.split("-")[1]) < hold]) < hold
            ):
                time.sleep(0.02)
        if task.index == stall and attempt == 1:
            time.sleep(120)
        outcome = (
            sweeps.run_task(task, key, keep, root)
            if real
            else sweeps.TaskOutcome(key, refusal="placement only")
        )
        record = {
            "index": task.index,
            "attempt": attempt,
            "model": task.model,
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": task.device,
            "start": start,
            "end": time.time(),
            "loaded": outcome.loaded,
        }
        (marks / f"done-{task.index}-{attempt}.json").write_text(json.dumps(record))
        return outcome

    return task_fn


def records(marks: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(marks.glob("done-*.json"))]


def most_at_once(runs: list[dict[str, Any]]) -> tuple[int, int]:
    """The most tasks running at one moment, and the most on one GPU at one moment."""
    most, most_per_gpu = 0, 0
    for r in runs:
        moment = r["start"] + 1e-6
        running = [o for o in runs if o["start"] <= moment < o["end"]]
        most = max(most, len(running))
        for gpu in {g for o in running for g in o["gpus"]}:
            most_per_gpu = max(most_per_gpu, sum(gpu in o["gpus"] for o in running))
    return most, most_per_gpu


def same_tables(a: sweeps.SweepState, b: sweeps.SweepState) -> None:
    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        assert ta.key == tb.key
        ra, rb = runstore.open_run(a.root / str(ta.run_id)), runstore.open_run(b.root / str(tb.run_id))
        assert ra.table_names == rb.table_names
        for name in ra.table_names:
            pd.testing.assert_frame_equal(ra.table(name), rb.table(name))


# ------------------------------------------------------------------------------ without Ray


def test_a_task_asks_one_gpu_by_default_and_a_fraction_only_when_the_file_says() -> None:
    assert spec_of(device="cuda").analyses[0].resources == Resources(1.0, 1.0)
    assert spec_of(device="cuda:0").analyses[0].resources.gpus == 1.0
    assert spec_of(device="cuda", resources={"gpus": 0.5}).analyses[0].resources.gpus == 0.5
    assert spec_of(device="cpu").analyses[0].resources.gpus == 0.0
    auto = spec_of().analyses[0].resources  # auto: settled by the cluster
    assert auto.gpus is None
    assert auto.on_cluster(True) == Resources(1.0, 1.0) and auto.on_cluster(False) == Resources(1.0, 0.0)
    assert spec_of(resources={"gpus": 0}).analyses[0].resources.on_cluster(True).gpus == 0.0
    with pytest.raises(sweeps.SweepSpecError, match=r"device = 'cuda' needs resources.gpus > 0"):
        spec_of(device="cuda", resources={"gpus": 0})
    with pytest.raises(sweeps.SweepSpecError, match=r"device = 'cpu' with resources.gpus = 1 holds GPUs"):
        spec_of(device="cpu", resources={"gpus": 1})
    with pytest.raises(sweeps.SweepSpecError, match=r"gpus -1 must be a number >= 0"):
        spec_of(resources={"gpus": -1})


def test_a_worker_uses_the_gpu_ray_gave_it() -> None:
    assert placed_device("cuda", ["2"], "2") == "cuda"  # Ray shows the worker its GPU alone: cuda:0
    assert placed_device("auto", ["2"], "2") == "cuda"
    assert placed_device("auto", [], None) == "cpu"  # no GPU held: never the node's first GPU
    assert placed_device("cpu", ["1"], "1") == "cpu"
    assert placed_device("cuda", ["3"], "0,1,2,3") == "cuda:3"  # every GPU visible: its own by index
    assert placed_device("auto", ["5"], "4,5") == "cuda:1"
    assert placed_device("cuda", ["1"], "1", simulate=True) == "cpu"


def test_requests_no_node_meets_and_gpus_a_task_cannot_see_are_refused() -> None:
    def work(**top: Any) -> list[driver.Planned]:
        return [driver.Planned(task, "key") for task in spec_of(**top).tasks()]

    with pytest.raises(ConfigError, match=r"device = 'cuda:1': a task on Ray sees only the GPUs it holds"):
        driver._shapes(work(device="cuda:1"), cpus=8, gpus=4)
    assert driver._shapes(work(device="cuda:1", resources={"gpus": 2}), cpus=8, gpus=4)[0] == Resources(1, 2)
    with pytest.raises(ConfigError, match=r"ask for 1 GPUs each and the Ray cluster has 0"):
        driver._shapes(work(device="cuda"), cpus=8, gpus=0)
    with pytest.raises(ConfigError, match=r"ask for 3 CPUs each and the Ray cluster has 2"):
        driver._shapes(work(resources={"cpus": 3}), cpus=2, gpus=0)
    assert driver._shapes(work(), cpus=8, gpus=0)[0] == Resources(1.0, 0.0)
    assert driver._shapes(work(), cpus=8, gpus=2)[0] == Resources(1.0, 1.0)


# ------------------------------------------------------------------------ on simulated GPUs


@pytest.mark.usefixtures("gpu_cluster")
def test_one_task_per_gpu_each_worker_on_its_own_gpu_and_results_equal_the_loop(tmp_path: Path) -> None:
    top = {"models": ["tiny-llama", "tiny-gpt2"], "seeds": 4, "resources": {"cpus": 0.5}}  # CPUs for 4
    marks = tmp_path / "marks"
    state = sweeps.run_sweep(
        spec_of(device="cuda", **top),
        root=tmp_path / "ray",
        task_fn=recording(marks, hold=GPUS),
        simulate_gpus=True,
        progress=False,
    )
    assert [t.status for t in state.tasks] == ["done"] * 8, sweeps.summary(state)
    runs = records(marks)
    assert len(runs) == 8 and all(len(r["gpus"]) == 1 and r["visible"] == r["gpus"][0] for r in runs)
    assert {r["device"] for r in runs} == {"cpu"}  # simulated: the model runs on the CPU
    assert {t.worker["device"] for t in state.tasks} == {"cpu (GPUs simulated)"}
    # as many at once as there are GPUs (the CPUs would allow twice as many), never two on one GPU
    assert most_at_once(runs) == (GPUS, 1)
    gpu_of: dict[int, set[str]] = {}
    for r in runs:
        gpu_of.setdefault(r["pid"], set()).add(r["gpus"][0])
    assert len(gpu_of) == GPUS and all(len(g) == 1 for g in gpu_of.values())  # a worker keeps its GPU
    assert set().union(*gpu_of.values()) == {str(i) for i in range(GPUS)}
    # a model is loaded once per worker that runs it, then reused there
    for pid in gpu_of:
        mine = [r for r in runs if r["pid"] == pid]
        assert sum(r["loaded"] for r in mine) == len({r["model"] for r in mine}), mine
    assert state.models_loaded == sum(r["loaded"] for r in runs) == 2 * GPUS  # not 8
    # the same tasks in a loop on the CPU: the same keys and tables
    loop = sweeps.run_sweep(
        spec_of(device="cpu", **top), root=tmp_path / "loop", in_process=True, progress=False
    )
    same_tables(loop, state)


@pytest.mark.usefixtures("gpu_cluster")
def test_two_tasks_share_a_gpu_only_when_the_file_asks(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    state = sweeps.run_sweep(
        spec_of(device="cuda", seeds=2, resources={"gpus": 0.5}),
        root=tmp_path / "runs",
        task_fn=recording(marks, hold=2, real=False),
        simulate_gpus=True,
        progress=False,
    )
    assert [t.status for t in state.tasks] == ["refused"] * 2, sweeps.summary(state)
    runs = records(marks)
    assert most_at_once(runs) == (2, 2)  # both at once on one GPU: Ray packs halves onto a card
    assert len({r["gpus"][0] for r in runs}) == 1


@pytest.mark.usefixtures("gpu_cluster")
def test_a_worker_killed_mid_task_its_task_runs_again_and_nothing_done_runs_twice(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    stalled = 2
    killed: dict[str, Any] = {}

    def kill_when_stalled() -> None:  # what an outside `kill -9` of the worker does
        deadline = time.monotonic() + 60
        mark = marks / f"start-{stalled}-1"
        while time.monotonic() < deadline and not mark.is_file():
            time.sleep(0.02)
        time.sleep(0.2)
        killed["done before"] = {r["index"] for r in records(marks)}
        killed["pid"] = int(mark.read_text())
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_stalled)
    killer.start()
    state = sweeps.run_sweep(
        spec_of(device="cuda", seeds=5),
        root=tmp_path / "runs",
        task_fn=recording(marks, stall=stalled),
        simulate_gpus=True,
        progress=False,
    )
    killer.join()
    assert [t.status for t in state.tasks] == ["done"] * 5, sweeps.summary(state)
    starts = sorted(m.name for m in marks.glob("start-*"))
    assert starts == sorted([f"start-{i}-1" for i in range(5)] + [f"start-{stalled}-2"])
    assert {r["index"]: r["attempt"] for r in records(marks)} == {**{i: 1 for i in range(5)}, stalled: 2}
    assert killed["done before"] and stalled not in killed["done before"]
    again = next(r for r in records(marks) if r["index"] == stalled)
    assert state.tasks[stalled].attempts == 2 and again["pid"] != killed["pid"]  # on a live worker
    assert len(runstore.list_runs(tmp_path / "runs")) == 5
