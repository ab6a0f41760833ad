"""Sweeps: the spec is checked before anything runs; tasks on a local Ray cluster give the same runs
as in-process; failures are retried then reported; an interrupted sweep resumes without redoing
work; a lost worker's task is run again. One Ray start serves the module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import ray
from typer.testing import CliRunner

import probe
from analyses import registry, runstore
from analyses import sweep as sweeps
from analyses.base import config_from_overrides
from analyses.sweep import driver
from analyses.sweep.keys import model_fingerprint
from analyses.sweep.spec import TaskSpec
from headlab.cli import app
from probe.errors import ConfigError, HeadlabError, RunStoreError
from probe.tiny import TINY_BUILDERS

CENSUS = "n_natural = 2, n_repeated = 2, seq_len = 16, repeat_len = 4, batch_size = 2, n_examples = 1"
SPEC = f"""
name = "small"
models = ["tiny-llama", "tiny-gpt2"]
seeds = [0, 1]
[analyses.census]
set = {{ {CENSUS} }}
[analyses.sinks]
set = {{ n_sequences = 2, n_examples = 1, seq_len = 16 }}
"""


def write(tmp_path: Path, text: str = SPEC, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def counting(marks: Path, fail: dict[int, str] | None = None):
    """A task function that leaves a mark per attempt, fails as ``fail`` says (task index ->
    "first" / "always" / "exit-first"), else runs the real task. Defined inside a function, so
    Ray pickles it by value into its workers."""
    fail = dict(fail or {})

    def task_fn(task: TaskSpec, key: str, keep: int, root: str | None) -> sweeps.TaskOutcome:
        marks.mkdir(parents=True, exist_ok=True)
        attempt = len(list(marks.glob(f"{task.index}-*"))) + 1
        (marks / f"{task.index}-{attempt}").touch()
        how = fail.get(task.index)
        if how == "always" or (how == "first" and attempt == 1):
            raise RuntimeError(f"injected failure of task {task.index}, attempt {attempt}")
        if how == "exit-first" and attempt == 1:
            os._exit(1)  # the worker process dies under the task
        return sweeps.run_task(task, key, keep, root)

    return task_fn


def attempts(marks: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for mark in marks.glob("*-*"):
        index = int(mark.name.split("-")[0])
        out[index] = out.get(index, 0) + 1
    return out


# ------------------------------------------------------------------------------------------ the spec


def test_bad_spec_reports_every_problem_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = write(
        tmp_path,
        """
models = ["tiny-llama", "no-such-model", "org/on-the-hub"]
seeds = [0, "x"]
colour = 3
[resources]
cpus = 0
[analyses.census]
set = { n_natural = "many", bogus = 1 }
grid = { mode = ["eager", "fast"] }
[analyses.vit-heads]
[analyses.nothing]
""",
    )
    with pytest.raises(sweeps.SweepSpecError) as caught:
        sweeps.load_spec(bad)
    problems = caught.value.problems
    for words in (
        "unknown key 'colour'",
        "seeds [0, 'x']",
        "'no-such-model' is neither",
        "looks like a hub id",
        "resources.cpus 0",
        "n_natural = 'many' is not of type int",
        "'bogus' is not a setting of CensusConfig",
        "mode = 'fast' is not of type choice of 'eager', 'recompute'",
        "tiny-llama is a language model and vit-heads runs on vision",
        "unknown analysis 'nothing'",
    ):
        assert sum(words in p for p in problems) == 1, (words, problems)
    assert len(problems) == 10
    # the CLI: one line per problem, exit status 2 through main(), and Ray never started
    monkeypatch.setattr(driver, "_ray", lambda: pytest.fail("Ray started for a bad spec"))
    result = CliRunner().invoke(app, ["sweep", str(bad), "--root", str(tmp_path / "runs")])
    assert isinstance(result.exception, sweeps.SweepSpecError)
    assert not (tmp_path / "runs").exists()


def test_a_valid_setting_that_fails_validation_is_reported(tmp_path: Path) -> None:
    with pytest.raises(sweeps.SweepSpecError, match=r"with seq_len=2: seq_len must be >= 4"):
        sweeps.load_spec(
            write(tmp_path, 'models = ["tiny-llama"]\n[analyses.census]\ngrid = { seq_len = [16, 2] }\n')
        )
    with pytest.raises(sweeps.SweepSpecError, match=r"needs resources.gpus > 0"):
        sweeps.load_spec(
            write(
                tmp_path,
                'models = ["tiny-llama"]\ndevice = "cuda"\nanalyses = ["census"]\n[resources]\ngpus = 0\n',
            )
        )
    with pytest.raises(sweeps.SweepSpecError, match=r"give seeds with the top-level seeds"):
        sweeps.load_spec(write(tmp_path, 'models = ["tiny-llama"]\n[analyses.census]\nset = { seed = 3 }\n'))
    with pytest.raises(
        sweeps.SweepSpecError, match=r"name 'my sweep.v2' must be .*e.g. name = 'my-sweep-v2'"
    ):
        sweeps.load_spec(
            write(tmp_path, 'name = "my sweep.v2"\nmodels = ["tiny-llama"]\nanalyses = ["census"]\n')
        )
    assert (
        sweeps.load_spec(
            write(tmp_path, 'models = ["tiny-llama"]\nanalyses = ["census"]\n', "my.sweep.toml")
        ).name
        == "my-sweep"
    )
    with pytest.raises(sweeps.SweepSpecError, match=r"seq_len=128 gives the same config as the defaults"):
        sweeps.load_spec(
            write(tmp_path, 'models = ["tiny-llama"]\n[analyses.census]\nlist = [{}, { seq_len = 128 }]\n')
        )
    with pytest.raises(sweeps.SweepSpecError, match=r"'colored-objects' is listed twice"):
        sweeps.load_spec(
            write(tmp_path, 'models = ["tiny-llama"]\nanalyses = ["colored-objects", "colored_objects"]\n')
        )
    with pytest.raises(sweeps.SweepSpecError, match=r"is not valid TOML"):
        sweeps.load_spec(write(tmp_path, "models = [\n"))


def test_tasks_expand_grid_list_models_and_seeds(tmp_path: Path) -> None:
    spec = sweeps.load_spec(
        write(
            tmp_path,
            """
models = ["tiny-llama", "tiny-gpt2"]
seeds = 3
[analyses.census]
set = { n_natural = 2 }
grid = { seq_len = [16, 32], batch_size = [1, 2] }
list = [{ mode = "eager" }, { mode = "recompute" }]
[analyses.atlas]
models = ["tiny-llama"]
""",
        )
    )
    tasks = spec.tasks()
    census = [t for t in tasks if t.analysis == "census"]
    assert len(census) == 2 * (2 * 2 * 2) * 3  # models x grid x list x seeds
    assert [t.analysis for t in tasks][-1] == "atlas" and tasks[-1].seed is None  # the atlas has no seed
    assert {t.model for t in census[:24]} == {"tiny-llama"}  # grouped by model
    first = census[0]
    assert first.config() == config_from_overrides(
        registry.get("census").config_cls,
        {"n_natural": 2, "seq_len": 16, "batch_size": 1, "mode": "eager", "seed": 0},
    )
    # YAML says the same
    yaml_spec = sweeps.load_spec(
        write(
            tmp_path,
            "models: [tiny-llama, tiny-gpt2]\nseeds: 3\nanalyses:\n  census:\n    set: {n_natural: 2}\n"
            "    grid: {seq_len: [16, 32], batch_size: [1, 2]}\n    list: [{mode: eager}, {mode: recompute}]\n"
            "  atlas:\n    models: [tiny-llama]\n",
            "sweep.yaml",
        )
    )
    assert [(t.model, t.analysis, dict(t.settings)) for t in yaml_spec.tasks()] == [
        (t.model, t.analysis, dict(t.settings)) for t in tasks
    ]


def test_fingerprint_is_the_loaded_models_checksum(tmp_path: Path, smollm: probe.LoadedModel) -> None:
    for name in ("tiny-llama", "tiny-gpt2", "tiny-vit"):
        assert model_fingerprint(name) == probe.load_model(name, device="cpu").weight_sha256
    model, tokenizer = TINY_BUILDERS["tiny-llama"].build(0, ())
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    assert (
        model_fingerprint(str(tmp_path / "ckpt"))
        == probe.load_model(str(tmp_path / "ckpt"), device="cpu").weight_sha256
    )
    assert model_fingerprint(probe.DEFAULT_MODEL) == smollm.weight_sha256


# --------------------------------------------------------------------------------- in this process


def test_in_process_sweep_equals_direct_runs_and_skips_a_run_made_by_hand(tmp_path: Path) -> None:
    spec = sweeps.load_spec(
        write(tmp_path, f'models = ["tiny-llama"]\nseeds = [0, 1]\n[analyses.census]\nset = {{ {CENSUS} }}\n')
    )
    root = tmp_path / "runs"
    # `headlab run` with the first task's settings: the same function, so the sweep skips it
    overrides = [f"--set={kv.strip().replace(' ', '')}" for kv in CENSUS.split(",")]
    made = CliRunner().invoke(
        app, ["run", "census", "--model", "tiny-llama", "--root", str(root), *overrides]
    )
    assert made.exit_code == 0, made.output
    state = sweeps.run_sweep(spec, root=root, in_process=True, progress=False)
    assert [t.status for t in state.tasks] == ["skipped", "done"]
    planned = sweeps.plan(spec)
    model = probe.load_model("tiny-llama", device="cpu")
    for item, task in zip(planned, state.tasks, strict=True):
        run = runstore.open_run(root / str(task.run_id))
        assert run.notes["task_key"] == item.key
        direct = registry.get("census").run(model, item.task.config())
        for name in direct.tables:
            pd.testing.assert_frame_equal(run.table(name), direct.tables[name], check_dtype=False)


def test_device_maps_in_a_sweep_file_are_checked_with_one_line_each(tmp_path: Path) -> None:
    def problems(text: str) -> list[str]:
        with pytest.raises(sweeps.SweepSpecError) as caught:
            sweeps.load_spec(write(tmp_path, 'models = ["tiny-llama"]\nanalyses = ["census"]\n' + text))
        return caught.value.problems

    assert problems("device_map = 3\n") == [
        "device_map 3 must be auto, balanced or a table of module = device "
        '(e.g. device_map = { "model.layers.0" = 0, ... })'
    ]
    (bad,) = problems('device_map = { "model.layers.0" = "tpu" }\n')
    assert bad.startswith("device_map: ") and "tpu" in bad
    assert problems('device = "cuda"\ndevice_map = "balanced"\n') == [
        "device = 'cuda' with a device_map: the map places every module; leave device out (auto)"
    ]
    (few,) = problems('device_map = { "model.layers.0" = 0, "model.layers.1" = 2 }\n[resources]\ngpus = 2\n')
    assert "names cuda:2 but each task holds 2 GPU(s)" in few and "resources.gpus = 3" in few
    spec = sweeps.load_spec(
        write(tmp_path, 'models = ["tiny-llama"]\nanalyses = ["census"]\ndevice_map = "auto"\n')
    )
    assert {t.device_map for t in spec.tasks()} == {"auto"}


def test_a_sweep_over_a_spread_model_equals_one_device(tmp_path: Path) -> None:
    """tiny-llama with layer 1 offloaded to the disk (accelerate's hooks bring its weights in, as
    they move activations between GPUs): the sweep's census tables equal the one-device sweep's."""
    spread = (
        'device_map = { "model.embed_tokens" = "cpu", "model.layers.0" = "cpu", "model.layers.1" = "disk", '
        '"model.layers.2" = "cpu", "model.norm" = "cpu", "model.rotary_emb" = "cpu", "lm_head" = "cpu" }\n'
    )
    base = f'models = ["tiny-llama"]\n[analyses.census]\nset = {{ {CENSUS} }}\n'
    runs = {}
    for label, extra in (("one", ""), ("spread", spread)):
        spec = sweeps.load_spec(write(tmp_path, extra + base, name=f"{label}.toml"))
        state = sweeps.run_sweep(spec, root=tmp_path / label, in_process=True, progress=False)
        assert [t.status for t in state.tasks] == ["done"]
        runs[label] = runstore.open_run(tmp_path / label / str(state.tasks[0].run_id))
    assert runs["spread"].manifest.model["device_map"]["model.layers.1"] == "disk"
    for name in ("heads",):
        pd.testing.assert_frame_equal(runs["spread"].table(name), runs["one"].table(name), rtol=1e-5)


def test_atlas_of_a_sweep_joins_the_sweeps_runs(tmp_path: Path) -> None:
    spec = sweeps.load_spec(
        write(
            tmp_path,
            f'models = ["tiny-llama"]\nseeds = [0, 1]\n[analyses.census]\nset = {{ {CENSUS} }}\n'
            "[analyses.sinks]\nset = { n_sequences = 2, n_examples = 1, seq_len = 16 }\n[analyses.atlas]\n",
        )
    )
    root = tmp_path / "runs"
    state = sweeps.run_sweep(spec, root=root, in_process=True, progress=False)
    assert [t.status for t in state.tasks] == ["done"] * 5
    atlas = runstore.open_run(root / str(state.tasks[-1].run_id))
    first = {t.analysis: t.run_id for t in reversed(state.tasks[:4])}
    assert atlas.notes["sources"] == {"census": first["census"], "sinks": first["sinks"]}
    again = sweeps.run_sweep(spec, root=root, in_process=True, progress=False)
    assert [t.status for t in again.tasks] == ["skipped"] * 5
    assert len(runstore.list_runs(root)) == 5
    # `headlab atlas --sweep` builds the same atlas from the sweep's runs
    spec_path = tmp_path / "sweep.toml"
    shown = CliRunner().invoke(app, ["atlas", "--sweep", str(spec_path), "--root", str(root)])
    assert shown.exit_code == 0, shown.output
    newest = max(runstore.list_runs(root, analysis="atlas"), key=lambda s: str(s.created))
    assert runstore.open_run(newest.path).notes["sources"] == atlas.notes["sources"]


def test_a_killed_driver_leaves_no_half_task_and_the_same_command_resumes(tmp_path: Path) -> None:
    spec_path = write(
        tmp_path,
        'name = "killed"\nmodels = ["tiny-llama"]\nseeds = 12\n[analyses.census]\n'
        "set = { n_natural = 8, seq_len = 64, n_repeated = 2, repeat_len = 8, batch_size = 2 }\n",
    )
    root = tmp_path / "runs"
    command = [
        sys.executable,
        "-m",
        "headlab.cli",
        "sweep",
        str(spec_path),
        "--root",
        str(root),
        "--in-process",
    ]
    driver_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len([p for p in root.glob("*") if not p.name.startswith(".")]) < 2:
        time.sleep(0.05)
    driver_process.send_signal(signal.SIGKILL)
    driver_process.wait()
    spec = sweeps.load_spec(spec_path)
    seen = sweeps.status(spec, root)
    finished = seen.counts()["done"]
    assert seen.state == "interrupted" and 2 <= finished < 12, seen.counts()
    assert seen.counts()["pending"] == 12 - finished  # the task in flight is pending again, not half done
    marks = tmp_path / "marks"
    resumed = sweeps.run_sweep(spec, root=root, in_process=True, task_fn=counting(marks), progress=False)
    assert resumed.counts()["skipped"] == finished and resumed.counts()["done"] == 12 - finished
    assert sum(attempts(marks).values()) == 12 - finished
    assert len(runstore.list_runs(root)) == 12 and runstore.temporaries(root) == []


def test_a_second_driver_of_the_same_sweep_is_refused(tmp_path: Path) -> None:
    spec = sweeps.load_spec(write(tmp_path, 'models = ["tiny-llama"]\nanalyses = ["census"]\n'))
    root = tmp_path / "runs"
    holder = sweeps.SweepState(root, spec, [])
    with holder.locked(), pytest.raises(RunStoreError, match="is being run by pid"):
        sweeps.run_sweep(spec, root=root, in_process=True, progress=False)
    assert sweeps.status(spec, root).state == "not started"


# ---------------------------------------------------------------------------------------- on Ray


@pytest.mark.usefixtures("ray_cluster")
def test_ray_sweep_equals_in_process_and_reuses_models(tmp_path: Path) -> None:
    spec = sweeps.load_spec(write(tmp_path))
    here = sweeps.run_sweep(spec, root=tmp_path / "here", in_process=True, progress=False)
    there = sweeps.run_sweep(spec, root=tmp_path / "ray", progress=False)
    assert [t.status for t in there.tasks] == ["done"] * 8
    assert 2 <= there.models_loaded <= 4  # two workers x two models, not one load per task
    pids = {t.worker["pid"] for t in there.tasks}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one
    assert {t.worker["threads"] for t in there.tasks} == {1}  # one CPU per task: one torch thread
    for a, b in zip(here.tasks, there.tasks, strict=True):
        assert a.key == b.key
        ra, rb = (
            runstore.open_run(tmp_path / "here" / str(a.run_id)),
            runstore.open_run(tmp_path / "ray" / str(b.run_id)),
        )
        assert ra.table_names == rb.table_names
        for name in ra.table_names:
            pd.testing.assert_frame_equal(ra.table(name), rb.table(name))
        assert rb.notes["sweep"] == {"name": "small", "task": b.index, "seed": b.seed}


@pytest.mark.usefixtures("ray_cluster")
def test_failed_tasks_are_retried_then_reported_while_the_rest_finish(tmp_path: Path) -> None:
    spec = sweeps.load_spec(write(tmp_path))
    marks = tmp_path / "marks"
    task_fn = counting(marks, {0: "first", 1: "always", 2: "exit-first"})
    state = sweeps.run_sweep(spec, root=tmp_path / "runs", max_retries=1, task_fn=task_fn, progress=False)
    status = {t.index: t.status for t in state.tasks}
    assert status == {0: "done", 1: "failed", 2: "done", **{i: "done" for i in range(3, 8)}}
    assert attempts(marks) == {0: 2, 1: 2, 2: 2, **{i: 1 for i in range(3, 8)}}
    failed = state.tasks[1]
    assert failed.attempts == 2 and "injected failure of task 1, attempt 2" in str(failed.error)
    assert "1 failed" in sweeps.summary(state) and "injected failure" in sweeps.summary(state)
    # the status command reads the same state from the store and the manifest
    shown = CliRunner().invoke(
        app, ["sweep", "status", str(tmp_path / "sweep.toml"), "--root", str(tmp_path / "runs")]
    )
    assert "sweep small: finished" in shown.output and "7 done, 1 failed" in shown.output


@pytest.mark.usefixtures("ray_cluster")
def test_a_refusal_is_not_retried(tmp_path: Path) -> None:
    spec = sweeps.load_spec(
        write(
            tmp_path,
            'models = ["tiny-llama"]\n[analyses.census]\nset = { seq_len = 100000, n_natural = 1, n_examples = 1 }\n',
        )
    )
    marks = tmp_path / "marks"
    state = sweeps.run_sweep(
        spec, root=tmp_path / "runs", max_retries=2, task_fn=counting(marks), progress=False
    )
    assert state.tasks[0].status == "refused" and "context" in str(state.tasks[0].error).lower()
    assert attempts(marks) == {0: 1}


@pytest.mark.usefixtures("ray_cluster")
def test_an_interrupted_sweep_resumes_without_redoing_work(tmp_path: Path) -> None:
    spec = sweeps.load_spec(write(tmp_path))
    root = tmp_path / "runs"

    def ctrl_c_after_three(state: sweeps.SweepState, task: sweeps.TaskState) -> None:
        if state.counts()["done"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweeps.run_sweep(spec, root=root, max_in_flight=1, on_result=ctrl_c_after_three, progress=False)
    seen = sweeps.status(spec, root)
    assert seen.state == "interrupted" and seen.counts()["done"] == 3 and seen.counts()["pending"] == 5
    marks = tmp_path / "marks"
    resumed = sweeps.run_sweep(spec, root=root, task_fn=counting(marks), progress=False)
    assert resumed.counts() == {**dict.fromkeys(resumed.counts(), 0), "skipped": 3, "done": 5}
    assert sum(attempts(marks).values()) == 5  # only the missing five ran
    assert len(runstore.list_runs(root)) == 8
    assert sweeps.status(spec, root).state == "finished"


@pytest.mark.usefixtures("ray_cluster")
def test_a_request_the_cluster_cannot_meet_is_refused_before_any_task(tmp_path: Path) -> None:
    spec = sweeps.load_spec(
        write(tmp_path, 'models = ["tiny-llama"]\nanalyses = ["census"]\n[resources]\ncpus = 64\n')
    )
    with pytest.raises(ConfigError, match=r"ask for 64 CPUs each and the Ray cluster has 2"):
        sweeps.run_sweep(spec, root=tmp_path / "runs", progress=False)
    assert runstore.list_runs(tmp_path / "runs") == []


def test_the_code_in_a_key_changes_with_result_code_only(tmp_path: Path) -> None:
    from analyses.sweep.keys import tree_fingerprint

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    (tmp_path / "probe").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "probe" / "a.py").write_text("x = 1\n")
    (tmp_path / "docs" / "a.md").write_text("words\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    commit = git("rev-parse", "HEAD")
    assert tree_fingerprint(tmp_path) == commit
    (tmp_path / "docs" / "a.md").write_text("other words\n")  # not result code: the same key
    (tmp_path / "notes.txt").write_text("left by a run\n")
    assert tree_fingerprint(tmp_path) == commit
    (tmp_path / "probe" / "a.py").write_text("x = 2\n")
    two = tree_fingerprint(tmp_path)
    assert two.startswith(f"{commit}-dirty-")
    (tmp_path / "probe" / "a.py").write_text("x = 3\n")
    three = tree_fingerprint(tmp_path)
    assert three.startswith(f"{commit}-dirty-") and three != two  # two edits of one commit differ
    (tmp_path / "probe" / "a.py").write_text("x = 2\n")
    assert tree_fingerprint(tmp_path) == two
    (tmp_path / "probe" / "new.py").write_text("y = 1\n")  # an untracked file of result code counts
    assert tree_fingerprint(tmp_path) not in (two, commit)


def test_a_cluster_that_cannot_be_joined_is_a_one_line_error() -> None:
    class NoCluster:
        def init(self, **kwargs: object) -> None:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    with pytest.raises(
        HeadlabError, match=r"could not join the Ray cluster at 10.0.0.1:6379 \(Failed"
    ) as caught:
        driver._connect(NoCluster(), "10.0.0.1:6379")
    assert "\n" not in str(caught.value) and "--address auto" in str(caught.value)
