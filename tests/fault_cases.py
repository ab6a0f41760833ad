"""The fault table: every way a user's input, a damaged file or an interruption can go wrong, and what
headlab must do about it.

Each case sets up a fresh workspace (a run root, a model cache, a report directory and a working
directory, all under one temporary directory), does one wrong thing, and is judged the same way:

* the exit status is the expected one (2 for an error the user can fix, 130 for Ctrl-C);
* stderr shows exactly one line, ``error: ...`` (what a terminal shows: progress bars that erase
  themselves do not count), and no traceback;
* the message names the fix (a key phrase, e.g. the command or option to use);
* nothing is left behind: no new file or directory in the workspace (hidden temporaries included)
  other than what the case allows.

CLI cases run ``headlab`` in this process (``headlab.cli.main`` with ``sys.argv`` set, stdout and
stderr captured) unless they need a process of their own (Ctrl-C: ``python -m headlab.cli`` sent
SIGINT while its analysis runs). Faults inside a command are injected by patching for the duration
of the call (a table that fails to write, a full disk, Ctrl-C while saving); a writer killed with
SIGKILL mid-save is a forked process stopped for good after its first table. API cases call probe
and the dashboard directly (hooks after an exception, padding, generation, HTTP checks). ``tests/test_faults.py``
runs every case; run this file to print the table::

    python tests/fault_cases.py [--only ID_SUBSTRING] [--markdown FILE]
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMALL = "--set n_natural=2 --set seq_len=16 --set n_repeated=2 --set repeat_len=4 --set n_examples=1"
"""Census settings that keep a tiny-model run to about a second."""

TINY_RUN = f"run census --model tiny-llama {SMALL}"


# ------------------------------------------------------------------------------------- workspace


@dataclass
class Shared:
    """What many cases copy: a finished census run and a saved tiny checkpoint (built once)."""

    base: Path
    run: Path  # a run directory (tiny-llama census)
    checkpoint: Path  # tiny-llama saved with save_pretrained, tokenizer included
    gguf_head: bytes = field(repr=False)  # the first bytes of a real .gguf file (or a bare GGUF header)


@dataclass
class Workspace:
    base: Path
    shared: Shared
    vars: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def runs(self) -> Path:
        return self.base / "runs"

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    @property
    def out(self) -> Path:
        return self.base / "out"

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def outside(self) -> Path:
        """Somewhere under the workspace but outside every root: targets of symlinks, stray copies."""
        return self.base / "outside"

    @classmethod
    def make(cls, base: Path, shared: Shared) -> Workspace:
        for sub in ("runs", "cache", "out", "work", "outside"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        ws = cls(base, shared)
        ws.vars.update(
            base=str(base),
            runs=str(ws.runs),
            cache=str(ws.cache),
            out=str(ws.out),
            work=str(ws.work),
            outside=str(ws.outside),
            run=shared.run.name,
        )
        ws.env.update(HEADLAB_RUNS=str(ws.runs), HEADLAB_CACHE=str(ws.cache))
        return ws

    def put_run(self, name: str | None = None, where: Path | None = None) -> Path:
        """A copy of the shared run under the run root (or ``where``), named ``name``."""
        target = (where or self.runs) / (name or self.shared.run.name)
        shutil.copytree(self.shared.run, target, symlinks=True)
        return target

    def put_checkpoint(self, where: Path | None = None) -> Path:
        target = where or (self.base / "ckpt")
        shutil.copytree(self.shared.checkpoint, target)
        self.vars["ckpt"] = str(target)
        return target


def snapshot(base: Path) -> set[str]:
    """Every path under ``base`` (files, directories, symlinks, hidden ones too), relative."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(base):
        rel = Path(dirpath).relative_to(base)
        for name in [*dirnames, *filenames]:
            found.add((rel / name).as_posix())
    return found


def visible(prefix: str) -> str:
    """A regex for ``prefix`` and anything under it whose every component is not hidden."""
    return rf"{re.escape(prefix)}(/(?!\.)[^/]+)*"


CACHE_SKELETON = r"cache/models"
"""The cache's (empty) models directory, which a writer may create before it fails."""

RUN_SAVED = r"runs/(?!\.)[^/]+(/(?!\.)[^/]+)*"
"""A new (visible) run directory and its files."""


# ------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. an injected fault that never fired

    @property
    def lines(self) -> list[str]:
        return shown_lines(self.stderr)

    @property
    def first_line(self) -> str:
        lines = self.lines
        return lines[0] if lines else ""


PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")
"""A progress bar's line (``census: natural text:  40%|####  | 2/5 [00:01<00:01, 2.5seq/s]``)."""


def shown_lines(text: str) -> list[str]:
    """The non-empty lines of ``text`` that are messages: on each line only what follows its last
    carriage return remains (what a terminal shows: progress bars redraw and erase themselves that
    way), and progress bars written to a file or pipe (one per line) are not messages."""
    lines = []
    for raw in text.split("\n"):
        shown = raw.split("\r")[-1].rstrip()
        if shown.strip() and not PROGRESS.search(shown):
            lines.append(shown)
    return lines


@contextlib.contextmanager
def environment(ws: Workspace) -> Iterator[None]:
    """The workspace's environment variables and working directory, restored afterwards."""
    saved = {k: os.environ.get(k) for k in [*ws.env, "HEADLAB_ALLOW_HUB"]}
    cwd = os.getcwd()
    os.environ.pop("HEADLAB_ALLOW_HUB", None)
    os.environ.update(ws.env)
    os.chdir(ws.work)
    try:
        yield
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(argv: Sequence[str], ws: Workspace, patches: Sequence[Patch] = ()) -> Outcome:
    """``headlab *argv`` in this process, as the console script runs it; nothing escapes."""
    from headlab import cli

    out, err = io.StringIO(), io.StringIO()
    notes: list[str] = []
    saved_argv = sys.argv
    t0 = time.perf_counter()
    code = 0
    with environment(ws), contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # A fresh process's warning filters, printing to (captured) stderr.
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = _show_warning
        for patch in patches:
            stack.enter_context(patch(ws, notes))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        sys.argv = ["headlab", *argv]
        try:
            cli.main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # what the interpreter would print: a traceback, status 1
            traceback.print_exc(file=err)
            code = 1
        finally:
            sys.argv = saved_argv
    return Outcome(code, out.getvalue(), err.getvalue(), time.perf_counter() - t0, notes)


def _code_path() -> str:
    """The directory holding the ``analyses`` package this process imported (a process must run the same)."""
    import analyses

    return str(Path(analyses.__file__).resolve().parent.parent)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_process(
    argv: Sequence[str], ws: Workspace, *, interrupt_after: str | None = None, timeout: float = 180
) -> Outcome:
    """``headlab *argv`` as a process of its own. ``interrupt_after``: send SIGINT (Ctrl-C) as soon as
    this text appears on its stderr."""
    env = {**os.environ, **ws.env}
    env.pop("HEADLAB_ALLOW_HUB", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_code_path(), env.get("PYTHONPATH")) if p)
    err_path, out_path = ws.base / "stderr.txt", ws.base / "stdout.txt"
    notes = []
    t0 = time.perf_counter()
    with err_path.open("w") as err_fh, out_path.open("w") as out_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "headlab.cli", *argv],
            cwd=ws.work,
            env=env,
            stdout=out_fh,
            stderr=err_fh,
            # a SIGINT ignored by the test process (some earlier test may leave it so) is inherited
            # and would make the CLI deaf to Ctrl-C: give the child the default disposition
            preexec_fn=_default_sigint,
        )
        try:
            if interrupt_after is not None:
                while proc.poll() is None and time.perf_counter() - t0 < timeout:
                    if interrupt_after in err_path.read_text(errors="replace"):
                        time.sleep(0.2)
                        proc.send_signal(signal.SIGINT)
                        break
                    time.sleep(0.05)
                else:
                    notes.append(f"the interrupt was never sent ({interrupt_after!r} did not appear)")
            code = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            notes.append(f"killed after {timeout} s")
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    out_path.unlink()
    err_path.unlink()
    return Outcome(code, stdout, stderr, time.perf_counter() - t0, notes)


# ------------------------------------------------------------------------------------- patches

Patch = Callable[[Workspace, list[str]], contextlib.AbstractContextManager[Any]]
"""In-process fault injection: entered around one CLI call; may note that its fault never fired."""


@contextlib.contextmanager
def setattr_for(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def setitem_for(mapping: Any, key: str, value: Any) -> Iterator[None]:
    had = key in mapping
    old = mapping.get(key)
    mapping[key] = value
    try:
        yield
    finally:
        if had:
            mapping[key] = old
        else:
            del mapping[key]


@contextlib.contextmanager
def no_model_load(ws: Workspace, notes: list[str]) -> Iterator[None]:
    """Loading a model is a failure: the command should have stopped before."""
    import probe
    import probe.loading

    def refuse(*args: Any, **kwargs: Any) -> Any:
        notes.append("the model was loaded (the problem was found only after the analysis)")
        raise AssertionError("load_model called before the run root was checked")

    with setattr_for(probe, "load_model", refuse), setattr_for(probe.loading, "load_model", refuse):
        yield


def wrap_analysis(name: str, after: Callable[[Any], None]) -> Patch:
    """Run analysis ``name`` as usual, then apply ``after`` to its result before the CLI saves it."""

    @contextlib.contextmanager
    def patch(ws: Workspace, notes: list[str]) -> Iterator[None]:
        from analyses import registry

        entry = registry.ANALYSES[name]

        def run(model: Any, config: Any) -> Any:
            result = entry.run(model, config)
            after(result)
            return result

        with setitem_for(registry.ANALYSES, name, dataclasses.replace(entry, run=run)):
            yield

    return patch


def _all_nan(result: Any) -> None:
    heads = result.tables["heads"]
    for column in heads.columns:
        if column not in ("layer", "head", "kv_head"):
            heads[column] = float("nan")


def _mixed_column(result: Any) -> None:
    heads = result.tables["heads"]
    heads["label"] = [1 if i % 2 else "x" for i in range(len(heads))]  # ints and strings: no Parquet type


def fail_while_saving(exc: Callable[[], BaseException]) -> Patch:
    """The first table written while a run is saved raises ``exc()`` once the file is on disk."""

    @contextlib.contextmanager
    def patch(ws: Workspace, notes: list[str]) -> Iterator[None]:
        import pandas as pd

        original = pd.DataFrame.to_parquet
        fired = []

        def to_parquet(self: Any, path: Any = None, *args: Any, **kwargs: Any) -> Any:
            result = original(self, path, *args, **kwargs)
            if not fired and path is not None and str(ws.runs) in str(path):
                fired.append(path)
                raise exc()
            return result

        with setattr_for(pd.DataFrame, "to_parquet", to_parquet):
            yield
        if not fired:
            notes.append("the injected fault never fired (no table was written under the run root)")

    return patch


@contextlib.contextmanager
def capture_error_in_layer_1(ws: Workspace, notes: list[str]) -> Iterator[None]:
    """A reducer that fails inside the capture (the analysis is half-way through)."""
    from probe import reducers
    from probe.errors import CaptureError

    rows, moments = reducers.RowEntropy.update, reducers.RowEntropy.update_moments

    def fail(layer: object) -> None:
        if layer == 1 or isinstance(layer, slice):  # a recompute capture hands every layer at once
            raise CaptureError("no attention rows were produced for layer 1; use mode='eager'")

    def update(self: Any, layer: Any, *args: Any, **kwargs: Any) -> Any:
        fail(layer)
        return rows(self, layer, *args, **kwargs)

    def update_moments(self: Any, layer: Any, *args: Any, **kwargs: Any) -> Any:
        fail(layer)
        return moments(self, layer, *args, **kwargs)

    with (
        setattr_for(reducers.RowEntropy, "update", update),
        setattr_for(reducers.RowEntropy, "update_moments", update_moments),
    ):
        yield


def catalogue_entry(name: str) -> Patch:
    """A catalogue model ``name`` whose converted checkpoint is the shared tiny one (in the case's cache)."""

    @contextlib.contextmanager
    def patch(ws: Workspace, notes: list[str]) -> Iterator[None]:
        from probe import zoo
        from probe.errors import MissingPackageError

        real = zoo.CATALOGUE["smollm2-135m"]
        nowhere = zoo.PackageFile(f"no_such_{name.replace('-', '_')}", "weights.gguf")
        spec = dataclasses.replace(
            real, name=name, pip=(f"{name}-weights==0",), weight_parts=(nowhere,), extra={}
        )

        def no_install(spec: Any) -> None:
            raise MissingPackageError(f"the package carrying {spec.name}", spec.pip_command)

        with setitem_for(zoo.CATALOGUE, name, spec), setattr_for(zoo, "install_packages", no_install):
            yield

    return patch


# ------------------------------------------------------------------------------------- setups


def _edit_manifest(run: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Change the manifest's JSON in place with ``edit`` (its return value is ignored)."""
    path = run / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def damage(how: Callable[[Path], Any]) -> Callable[[Workspace], None]:
    """Setup: the shared run under the root, then ``how(run_dir)``."""

    def setup(ws: Workspace) -> None:
        how(ws.put_run())

    return setup


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 64, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _two_runs_sharing_a_prefix(ws: Workspace) -> None:
    first = ws.put_run()
    ws.put_run(first.name[:-4] + "ffff")
    ws.vars["prefix"] = first.name[:-4]


def _older_intact_newer(how: Callable[[Workspace, Path], None]) -> Callable[[Workspace], None]:
    """An intact run, plus a newer one damaged by ``how`` (so 'latest' must skip it)."""

    def setup(ws: Workspace) -> None:
        ws.put_run()
        newer = ws.runs / "29991231-235959-census-tiny-llama-beef"
        ws.vars["newer"] = newer.name
        how(ws, newer)

    return setup


def _newer_copy(ws: Workspace, target: Path, where: Path | None = None) -> Path:
    run = ws.put_run(target.name, where=where or target.parent)

    def newer(data: dict[str, Any]) -> None:
        data["created"] = "2999-12-31T23:59:59+00:00"
        data["run_id"] = target.name

    _edit_manifest(run, newer)
    return run


def _symlinked_run(ws: Workspace, target: Path) -> None:
    real = _newer_copy(ws, target, where=ws.outside)
    target.symlink_to(real, target_is_directory=True)


def _symlinked_table(ws: Workspace, target: Path) -> None:
    run = _newer_copy(ws, target)
    table = run / "heads.parquet"
    shutil.move(table, ws.outside / "heads.parquet")
    table.symlink_to(ws.outside / "heads.parquet")


def _plain_damage(how: Callable[[Path], Any]) -> Callable[[Workspace, Path], None]:
    def setup(ws: Workspace, target: Path) -> None:
        how(_newer_copy(ws, target))

    return setup


def _checkpoint(how: Callable[[Path], Any]) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        how(ws.put_checkpoint())

    return setup


def _random_bytes(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(os.urandom(size))


def _bad_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")  # a header length far beyond the file
    path.write_bytes(bytes(data))


def _no_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (directory / name).unlink(missing_ok=True)


def _gguf(content: Callable[[Shared], bytes]) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        path = ws.outside / "model.gguf"
        path.write_bytes(content(ws.shared))
        ws.vars["gguf"] = str(path)

    return setup


def _converted_catalogue_model(name: str, how: Callable[[Path], Any]) -> Callable[[Workspace], None]:
    """The shared tiny checkpoint converted into the case's cache as catalogue model ``name``."""

    def setup(ws: Workspace) -> None:
        from probe import cache

        directory = ws.put_checkpoint(ws.cache / "models" / name)
        cache.write_marker(directory, {"name": name, "source_sha256": "0" * 64, "kind": "language"})
        how(directory)

    return setup


def _file_at(rel: str) -> Callable[[Workspace], None]:
    """Setup: a regular file at ``base/rel`` (paths under it cannot be created)."""

    def setup(ws: Workspace) -> None:
        path = ws.base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a file, not a directory\n")

    return setup


def _unwritable_cache(ws: Workspace) -> None:
    (ws.base / "cachefile").write_text("a file, not a directory\n")
    ws.env["HEADLAB_CACHE"] = str(ws.base / "cachefile" / "cache")


def both(*setups: Callable[[Workspace], None]) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        for s in setups:
            s(ws)

    return setup


# ------------------------------------------------------------------------------------- extra checks


def _table_rows(stdout: str) -> list[list[str]]:
    """The rows of a plain-text table (``headlab runs``) below its dashed rule."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("---"):
            return [row.split() for row in lines[i + 1 :] if row.strip()]
    return []


def check_two_copies(ws: Workspace, outcome: Outcome) -> list[str]:
    ids = [row[0] for row in _table_rows(outcome.stdout)]
    problems = []
    if len(ids) != 2 or len(set(ids)) != 2:
        problems.append(f"the first column of `headlab runs` is {ids}, not two distinct run references")
    for i, ref in enumerate(dict.fromkeys(ids)):
        report = run_cli(["report", ref, "--out", str(ws.out / f"copy{i}.html")], ws)
        if report.code != 0:
            problems.append(
                f"`headlab report {ref}` (a reference `headlab runs` printed) failed: {report.first_line}"
            )
    return problems


def check_listed_damaged(ws: Workspace, outcome: Outcome) -> list[str]:
    rows = {row[0]: " ".join(row[1:]) for row in _table_rows(outcome.stdout)}
    newer = ws.vars["newer"]
    problems = []
    if newer not in rows:
        problems.append(f"{newer} is not listed by `headlab runs`")
    elif "damaged" not in rows[newer]:
        problems.append(f"{newer} is listed as intact: {rows[newer]}")
    intact = ws.shared.run.name
    if intact in rows and "damaged" in rows[intact]:
        problems.append(f"the intact run {intact} is listed as damaged")
    return problems


def check_latest_is_intact(ws: Workspace, outcome: Outcome) -> list[str]:
    if ws.shared.run.name not in outcome.stdout:
        return [f"`headlab report latest` did not pick the intact run: {outcome.stdout.strip()[:200]}"]
    return []


def check_suggestion_works(ws: Workspace, outcome: Outcome) -> list[str]:
    """The message suggests ``--set key=value``: the key exists, and the run then succeeds."""
    from analyses.census import CensusConfig

    found = re.search(r"--set\s+(\w+)=(\d+)", "\n".join(outcome.lines))
    if not found:
        return ["no `--set key=value` suggestion to try"]
    key = found.group(1)
    if key not in {f.name for f in dataclasses.fields(CensusConfig)}:
        return [f"the suggested setting {key!r} does not exist"]
    argv = [*ws.vars["argv"], "--set", f"{key}={found.group(2)}"]
    retry = run_cli(argv, ws)
    return [] if retry.code == 0 else [f"the suggested {found.group(0)} then fails: {retry.first_line}"]


def check_no_pwned(ws: Workspace, outcome: Outcome) -> list[str]:
    stray = [p for p in (ws.base.parent / "x", ws.base / "x", ws.out.parent / "x") if p.exists()]
    return [f"written outside --out: {p}" for p in stray]


def check_sanity_matches_reference(ws: Workspace, outcome: Outcome) -> list[str]:
    reference = reference_continuation("tiny-llama")
    if f"-> {reference!r}" not in outcome.stdout:
        return [f"`headlab sanity` printed no greedy continuation equal to transformers' {reference!r}"]
    return []


def check_stale_removed(ws: Workspace, outcome: Outcome) -> list[str]:
    """The dead writer's temporary is named in the output and gone; the live writer's is still there."""
    problems = []
    parent = Path(ws.vars["parent"])
    dead, live = ws.vars["dead"], ws.vars["live"]
    if dead not in outcome.stdout + outcome.stderr:
        problems.append(f"the output does not mention the stale {dead}")
    if (parent / dead).exists():
        problems.append(f"the stale {dead} was not removed")
    if live and not (parent / live).is_dir():
        problems.append(f"{live}, which a live writer holds, was removed")
    return problems


# ------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One row of the fault table (a CLI call).

    ``argv`` is formatted with the workspace's variables ({runs}, {out}, {run}, {ckpt}, ...).
    ``phrase``: a regex the message (stderr; stdout when ``exit`` is 0) must match: the fix.
    ``forbid``: a regex the message must not match. ``leaves``: regexes of paths (relative to the
    workspace) that may appear. ``check``: more problems found after the call (it may run more).
    """

    id: str
    family: str
    argv: str
    exit: int
    phrase: str | None = None
    new: bool = False  # one of the faults of the issue (failing before it was fixed)
    setup: Callable[[Workspace], None] | None = None
    patches: tuple[Patch, ...] = ()
    forbid: str | None = None
    leaves: tuple[str, ...] = ()
    check: Callable[[Workspace, Outcome], list[str]] | None = None
    process: bool = False  # run as a process of its own
    interrupt_after: str | None = None
    prefix: str = r"error: "  # how the one message line must start
    usage: bool = False  # a command-line usage error printed by the argument parser (usage + box)


def C(id: str, family: str, argv: str, exit: int = 2, phrase: str | None = None, **kw: Any) -> Case:
    return Case(id=id, family=family, argv=argv, exit=exit, phrase=phrase, **kw)


def _set(analysis: str, setting: str, phrase: str, model: str = "tiny-llama") -> Case:
    return C(
        f"set-{analysis}-{setting.split('=')[0] or 'empty'}-{re.sub(r'[^a-z0-9]+', '', setting.split('=', 1)[-1].lower())[:12] or 'x'}",
        "bad --set",
        f"run {analysis} --model {model} --set {shlex.quote(setting)}",
        2,
        phrase,
    )


BAD_SETS = [
    _set("census", "colour=red", r"unknown setting 'colour'.*valid: .*n_natural"),
    _set("census", "n_natural=three", r"n_natural='three' is not a valid int"),
    _set("census", "seq_len=12.5", r"seq_len='12.5' is not a valid int"),
    _set("census", "n_natural=0", r"n_natural must be >= 1"),
    _set("census", "seq_len=2", r"seq_len must be >= 4"),
    _set("census", "repeat_len=1", r"repeat_len must be >= 2"),
    _set("census", "batch_size=0", r"batch_size must be >= 1"),
    _set("census", "mode=fused", r"mode.*eager.*recompute"),
    _set("census", "=3", r"unknown setting ''.*valid:"),
    _set("sinks", "eps=1.5", r"eps.*between 0 and 1"),
    _set("sinks", "inputs=natural,bogus", r"bogus.*natural, random, repeated"),
    _set("sinks", "inputs=natural,natural", r"twice"),
    _set("sinks", "hidden_min_queries=80", r"must be below seq_len"),
    _set("sinks", "norms=maybe", r"norms='maybe' is not a valid bool"),
    _set("sinks", "n_sequences=-1", r"n_sequences must be >= 1"),
    _set("act", "tasks=sentimnt", r"Did you mean 'sentiment'"),
    _set("act", "keep=all", r"keep.*not_lower.*raise"),
    _set("act", "beta=high", r"beta='high' is not a valid float"),
    _set("act", "jsonl=/no/such/items.jsonl", r"give the path of a JSONL file"),
    _set("retrieval", "lengths=32", r"lengths must be context sizes >= 64"),
    _set("retrieval", "depths=1.5", r"depths must lie in \[0, 1\]"),
    _set("retrieval", "span=middle", r"span.*answer.*needle"),
    _set("retrieval", "threshold=0", r"threshold must be in \(0, 1\)"),
    _set("ioi", "n_items=1", r"use at least 2 prompts"),
    _set("ioi", "reuse_percents=0", r"percentages in \(0, 100\]"),
    _set("colored-objects", "min_share=1", r"a share of the gap in \[0, 1\)"),
    _set("circuit-reuse", "max_senders=0", r"test at least 1 head, or none"),
    _set("vit-heads", "preset=huge", r"default.*small", model="tiny-vit"),
    _set("vhd", "split=odd", r"split.*conflict.*iid", model="tiny-llava"),
    C("set-census-no-equals", "bad --set", "run census --model tiny-llama --set seed", 2, r"write key=value"),
]

INPUTS = [
    C(
        "model-unknown-name",
        "bad input",
        f"run census --model tiny-lama {SMALL}",
        2,
        r"Did you mean 'tiny-llama'",
    ),
    C(
        "fetch-unknown-name",
        "bad input",
        "fetch smollm3-135m",
        2,
        r"Did you mean 'smollm2-135m'.*headlab models",
    ),
    C(
        "model-hub-id-without-allow-hub",
        "bad input",
        f"run census --model someorg/somemodel {SMALL}",
        2,
        r"--allow-hub",
    ),
    C(
        "analysis-unknown",
        "bad input",
        "run nosuch --model tiny-llama",
        2,
        r"No such command 'nosuch'",
        usage=True,
    ),
    C(
        "dtype-unknown",
        "bad input",
        f"run census --model tiny-llama --dtype float8 {SMALL}",
        2,
        r"choose one of float32, bfloat16, float16",
    ),
    C(
        "bos-unknown",
        "bad input",
        f"run census --model tiny-llama --bos sometimes {SMALL}",
        2,
        r"choose default, always or never",
    ),
    C(
        "n-examples-census",
        "bad input",
        "run census --model tiny-llama --set n_natural=3 --set n_examples=5",
        2,
        r"\b0\b.*\b3\b",
        new=True,
    ),
    C(
        "n-examples-sinks",
        "bad input",
        "run sinks --model tiny-llama --set n_sequences=3 --set n_examples=9",
        2,
        r"\b0\b.*\b3\b",
        new=True,
    ),
    C(
        "model-missing-path",
        "bad input",
        f"run census --model ./no/such/dir {SMALL}",
        2,
        r"(?i)no such",
        new=True,
        forbid=r"unknown model",
    ),
    C(
        "device-tpu",
        "bad input",
        f"run census --model tiny-llama --device tpu {SMALL}",
        2,
        r"use (--device )?cpu",
        new=True,
    ),
    C(
        "device-meta",
        "bad input",
        f"run census --model tiny-llama --device meta {SMALL}",
        2,
        r"use (--device )?(cpu|auto)",
        new=True,
    ),
    C(
        "context-too-long",
        "bad input",
        "run census --model tiny-gpt2 --set seq_len=400 --set n_natural=1 --set n_repeated=1 --set repeat_len=4 --set n_examples=1",
        2,
        r"--set seq_len=\d+",
        new=True,
        check=check_suggestion_works,
        setup=lambda ws: ws.vars.update(
            argv=shlex.split(
                "run census --model tiny-gpt2 --set seq_len=400 --set n_natural=1 --set n_repeated=1 --set repeat_len=4 --set n_examples=1"
            )
        ),
    ),
    C(
        "sanity-greedy-equals-generate",
        "generation",
        "sanity --model tiny-llama --device cpu",
        0,
        r"greedy: ",
        new=True,
        check=check_sanity_matches_reference,
    ),
]

RUN_REFERENCES = [
    C(
        "report-unknown-id",
        "run references",
        "report 20200101-nosuch",
        2,
        r"headlab runs",
        setup=lambda ws: ws.put_run(),
    ),
    C(
        "report-ambiguous-prefix",
        "run references",
        "report {prefix}",
        2,
        r"give more characters",
        setup=_two_runs_sharing_a_prefix,
    ),
    C("report-latest-no-runs", "run references", "report latest", 2, r"run an analysis first"),
    C(
        "report-latest-other-analysis",
        "run references",
        "report latest:sinks",
        2,
        r"no sinks run",
        setup=lambda ws: ws.put_run(),
    ),
    C("report-empty-reference", "run references", "report ''", 2, r"pass a run id"),
    C("report-latest-bad-name", "run references", "report 'latest:bad name'", 2, r"use 1-64 letters"),
    C(
        "report-path-not-a-dir",
        "run references",
        "report {outside}/file.txt",
        2,
        r"check the path",
        setup=_file_at("outside/file.txt"),
    ),
    C("runs-root-missing", "run references", "runs --root {base}/nowhere", 0, r"\(no runs\)"),
    C(
        "report-not-a-run-dir",
        "run references",
        "report /etc --out {out}",
        2,
        r"(?i)not a (headlab )?run|no manifest|manifest\.json",
        new=True,
        forbid=r"remove the directory",
    ),
    C(
        "report-empty-dir",
        "run references",
        "report {outside} --out {out}",
        2,
        r"(?i)not a (headlab )?run|no manifest|manifest\.json",
        new=True,
        forbid=r"remove the directory",
    ),
    C(
        "runs-two-copies",
        "run references",
        "runs",
        0,
        None,
        new=True,
        leaves=(visible("out"),),
        check=check_two_copies,
        setup=lambda ws: (ws.put_run(), ws.put_run(ws.shared.run.name + ".bak")),
    ),
]


def _damaged(id: str, how: Callable[[Path], Any], phrase: str, new: bool = False) -> Case:
    return C(
        f"damaged-{id}", "damaged runs", "report {run} --out {out}", 2, phrase, new=new, setup=damage(how)
    )


DAMAGED = [
    _damaged(
        "manifest-missing",
        lambda r: (r / "manifest.json").unlink(),
        r"manifest\.json is missing.*re-run the analysis",
    ),
    _damaged(
        "manifest-bad-json",
        lambda r: _truncate(r / "manifest.json", 0.6),
        r"not valid JSON.*re-run the analysis",
    ),
    _damaged(
        "manifest-not-object",
        lambda r: (r / "manifest.json").write_text("[1, 2]"),
        r"does not hold a JSON object",
    ),
    _damaged(
        "schema-newer", lambda r: _edit_manifest(r, lambda d: d.update(schema_version=99)), r"upgrade headlab"
    ),
    _damaged(
        "schema-zero",
        lambda r: _edit_manifest(r, lambda d: d.update(schema_version=0)),
        r"schema version 0.*re-run",
    ),
    _damaged(
        "manifest-field-missing",
        lambda r: _edit_manifest(r, lambda d: d.pop("config")),
        r"field 'config' is missing",
    ),
    _damaged(
        "created-not-a-time",
        lambda r: _edit_manifest(r, lambda d: d.update(created="yesterday")),
        r"not an ISO timestamp",
    ),
    _damaged(
        "table-name-invalid",
        lambda r: _edit_manifest(r, lambda d: d["tables"].update({"../x": d["tables"]["heads"]})),
        r"invalid name '\.\./x'",
    ),
    _damaged(
        "table-missing",
        lambda r: (r / "heads.parquet").unlink(),
        r"heads\.parquet listed in manifest\.json is missing",
    ),
    _damaged(
        "table-truncated", lambda r: _truncate(r / "heads.parquet"), r"heads\.parquet has \d+ bytes but"
    ),
    _damaged("table-edited", lambda r: _flip_middle(r / "heads.parquet"), r"does not match its sha256"),
    _damaged("array-missing", lambda r: next((r / "arrays").iterdir()).unlink(), r"arrays/.* is missing"),
    _damaged(
        "table-rehashed-rows-wrong",
        lambda r: _edit_manifest(r, lambda d: d["tables"]["heads"].update(rows=999)),
        r"999",
    ),
    C(
        "damaged-stray-file-is-harmless",
        "damaged runs",
        "report {run} --out {out}",
        0,
        r"report written",
        leaves=(visible("out"),),
        setup=damage(lambda r: (r / "notes.txt").write_text("my notes on this run\n")),
    ),
    C(
        "damaged-listed-by-runs",
        "damaged runs",
        "runs",
        0,
        r"damaged",
        check=check_listed_damaged,
        setup=_older_intact_newer(_plain_damage(lambda r: _truncate(r / "heads.parquet"))),
    ),
    C(
        "damaged-latest-skips",
        "damaged runs",
        "report latest --out {out}",
        0,
        r"report written",
        leaves=(visible("out"),),
        check=check_latest_is_intact,
        setup=_older_intact_newer(_plain_damage(lambda r: _truncate(r / "heads.parquet"))),
    ),
    C(
        "damaged-latest-only-damaged",
        "damaged runs",
        "report latest",
        2,
        r"no intact run.*re-run the analysis",
        setup=damage(lambda r: _truncate(r / "heads.parquet")),
    ),
]


SYMLINKS = [
    C(
        "symlink-run-dir-listed-damaged",
        "symlinks",
        "runs",
        0,
        r"damaged",
        new=True,
        check=check_listed_damaged,
        setup=_older_intact_newer(_symlinked_run),
    ),
    C(
        "symlink-run-dir-report-refused",
        "symlinks",
        "report {newer} --out {out}",
        2,
        r"(?i)symlink|link|outside",
        new=True,
        setup=_older_intact_newer(_symlinked_run),
    ),
    C(
        "symlink-run-dir-latest-skips",
        "symlinks",
        "report latest --out {out}",
        0,
        r"report written",
        new=True,
        leaves=(visible("out"),),
        check=check_latest_is_intact,
        setup=_older_intact_newer(_symlinked_run),
    ),
    C(
        "symlink-table-listed-damaged",
        "symlinks",
        "runs",
        0,
        r"damaged",
        new=True,
        check=check_listed_damaged,
        setup=_older_intact_newer(_symlinked_table),
    ),
    C(
        "symlink-table-report-refused",
        "symlinks",
        "report {newer} --out {out}",
        2,
        r"(?i)symlink|link|outside",
        new=True,
        setup=_older_intact_newer(_symlinked_table),
    ),
    C(
        "symlink-table-latest-skips",
        "symlinks",
        "report latest --out {out}",
        0,
        r"report written",
        new=True,
        leaves=(visible("out"),),
        check=check_latest_is_intact,
        setup=_older_intact_newer(_symlinked_table),
    ),
    C(
        "report-run-id-traversal",
        "symlinks",
        "report {run} --out {out}/a/b",
        2,
        r"(?i)run.?id|invalid|name",
        new=True,
        setup=damage(lambda r: _edit_manifest(r, lambda d: d.update(run_id="../../x/pwned"))),
        check=check_no_pwned,
    ),
    C(
        "report-run-id-traversal-default-out",
        "symlinks",
        "report {run}",
        2,
        r"(?i)run.?id|invalid|name",
        new=True,
        setup=damage(lambda r: _edit_manifest(r, lambda d: d.update(run_id="../../x/pwned"))),
        check=check_no_pwned,
    ),
]

SAVING = [
    C(
        "save-heads-all-nan",
        "interrupted runs",
        TINY_RUN,
        2,
        r"NaN",
        new=True,
        patches=(wrap_analysis("census", _all_nan),),
    ),
    C(
        "save-table-not-parquet",
        "interrupted runs",
        TINY_RUN,
        2,
        r"astype\(str\)",
        patches=(wrap_analysis("census", _mixed_column),),
    ),
    C(
        "save-disk-full",
        "interrupted runs",
        TINY_RUN,
        2,
        r"free space|another root",
        patches=(fail_while_saving(lambda: OSError(errno.ENOSPC, "No space left on device")),),
    ),
    C(
        "save-error-in-capture",
        "interrupted runs",
        TINY_RUN,
        2,
        r"use mode='eager'",
        patches=(capture_error_in_layer_1,),
    ),
    C(
        "save-ctrl-c",
        "interrupted runs",
        TINY_RUN,
        130,
        r"(?i)nothing|no run|kept|saved",
        new=True,
        prefix=r"(error: )?interrupted",
        patches=(fail_while_saving(KeyboardInterrupt),),
    ),
    C(
        "ctrl-c-process",
        "interrupted runs",
        "run census --model tiny-llama --set n_natural=800 --set seq_len=48 --set batch_size=1",
        130,
        r"(?i)nothing|no run|kept|saved",
        new=True,
        process=True,
        interrupt_after="census:",
        prefix=r"(error: )?interrupted",
    ),
    C(
        "root-is-a-file",
        "interrupted runs",
        f"{TINY_RUN} --root {{outside}}/file.txt",
        2,
        r"--root|HEADLAB_RUNS",
        new=True,
        setup=_file_at("outside/file.txt"),
        patches=(no_model_load,),
    ),
    C(
        "root-under-a-file",
        "interrupted runs",
        f"{TINY_RUN} --root {{outside}}/file.txt/runs",
        2,
        r"--root|HEADLAB_RUNS",
        new=True,
        setup=_file_at("outside/file.txt"),
        patches=(no_model_load,),
    ),
]

MODELS = [
    C(
        "checkpoint-safetensors-truncated",
        "damaged models",
        f"run census --model {{ckpt}} {SMALL}",
        2,
        r"model\.safetensors",
        new=True,
        setup=_checkpoint(lambda d: _truncate(d / "model.safetensors")),
    ),
    C(
        "checkpoint-safetensors-random",
        "damaged models",
        f"run census --model {{ckpt}} {SMALL}",
        2,
        r"model\.safetensors",
        new=True,
        setup=_checkpoint(lambda d: _random_bytes(d / "model.safetensors")),
    ),
    C(
        "checkpoint-safetensors-bad-header",
        "damaged models",
        f"run census --model {{ckpt}} {SMALL}",
        2,
        r"model\.safetensors",
        new=True,
        setup=_checkpoint(lambda d: _bad_header(d / "model.safetensors")),
    ),
    C(
        "checkpoint-no-tokenizer",
        "damaged models",
        f"run census --model {{ckpt}} {SMALL}",
        2,
        r"(?i)tokenizer",
        new=True,
        setup=_checkpoint(_no_tokenizer),
    ),
    C(
        "gguf-truncated",
        "damaged models",
        f"run census --model {{gguf}} {SMALL}",
        2,
        r"(?i)gguf",
        new=True,
        leaves=(CACHE_SKELETON,),
        setup=_gguf(lambda s: s.gguf_head),
    ),
    C(
        "gguf-random-bytes",
        "damaged models",
        f"run census --model {{gguf}} {SMALL}",
        2,
        r"(?i)gguf",
        new=True,
        leaves=(CACHE_SKELETON,),
        setup=_gguf(lambda s: os.urandom(1 << 16)),
    ),
    C(
        "gguf-empty",
        "damaged models",
        f"run census --model {{gguf}} {SMALL}",
        2,
        r"(?i)gguf",
        new=True,
        leaves=(CACHE_SKELETON,),
        setup=_gguf(lambda s: b""),
    ),
    C(
        "cache-model-damaged",
        "damaged models",
        f"run census --model fault-llama {SMALL}",
        2,
        r"headlab fetch fault-llama --force",
        new=True,
        setup=_converted_catalogue_model("fault-llama", lambda d: _flip_middle(d / "model.safetensors")),
        patches=(catalogue_entry("fault-llama"),),
    ),
    C(
        "cache-unwritable-fetch",
        "damaged models",
        "fetch smollm2-135m --no-install",
        2,
        r"HEADLAB_CACHE",
        new=True,
        setup=_unwritable_cache,
    ),
    C(
        "cache-unwritable-gguf",
        "damaged models",
        f"run census --model {{gguf}} {SMALL}",
        2,
        r"HEADLAB_CACHE",
        new=True,
        setup=both(_unwritable_cache, _gguf(lambda s: s.gguf_head)),
    ),
    C(
        "report-out-unwritable",
        "damaged models",
        "report {run} --out {outside}/file.txt/r.html",
        2,
        r"--out",
        new=True,
        setup=both(_file_at("outside/file.txt"), lambda ws: ws.put_run()),
    ),
]


def _temporaries(parent: str, dead: str, live: str) -> Callable[[Workspace], None]:
    """Setup: under ``parent`` (of the workspace), a temporary directory ``dead`` whose writer died
    (``kill -9`` mid-write: its lock names a pid that no longer runs and nobody holds it), and one,
    ``live``, whose lock a live writer holds while the command runs (see :func:`hold_live_lock`)."""

    def setup(ws: Workspace) -> None:
        where = ws.base / parent
        where.mkdir(parents=True, exist_ok=True)
        dead_dir, live_dir = where / dead.format_map(ws.vars), where / live.format_map(ws.vars)
        shutil.copytree(ws.shared.run, dead_dir)  # half a run, or half a model: some files
        info = {"pid": _dead_pid(), "host": _hostname(), "started": time.time() - 60}
        (dead_dir / LOCK_NAME).write_text(json.dumps(info))
        live_dir.mkdir()
        (live_dir / "model.safetensors").write_bytes(b"being written")
        lock = live_dir / LOCK_NAME
        lock.write_text(json.dumps({"pid": os.getpid(), "host": _hostname(), "started": time.time()}))
        ws.vars.update(parent=str(where), dead=dead_dir.name, live=live_dir.name, live_lock=str(lock))

    return setup


LOCK_NAME = ".headlab-writer.lock"
"""A writer's lock in its temporary directory (probe.tempdirs): JSON pid, host and start time, flocked
by the writer for as long as it writes."""


def _killed_mid_save(ws: Workspace) -> None:
    """Setup: a real writer process killed with SIGKILL half-way through saving a run.

    A fork of this process saves the shared run's tables under the run root and is stopped for good
    right after the first table is on disk: the run's hidden temporary and its lock stay behind, and
    the kernel drops the dead writer's flock."""
    import pandas as pd

    from analyses import runstore

    run = runstore.open_run(ws.shared.run)
    tables = {name: run.table(name) for name in run.table_names}
    arrays = {name: run.array(name) for name in run.array_names}
    pid = os.fork()
    if pid == 0:  # the writer: never returns
        try:
            original = pd.DataFrame.to_parquet

            def write_then_hang(self: Any, path: Any = None, *args: Any, **kwargs: Any) -> None:
                original(self, path, *args, **kwargs)
                while True:
                    time.sleep(1)

            pd.DataFrame.to_parquet = write_then_hang  # type: ignore[method-assign]
            runstore.write_run(
                ws.runs,
                analysis=run.analysis,
                model_info=run.manifest.model,
                config=run.manifest.config,
                tables=tables,
                arrays=arrays,
            )
        finally:
            os._exit(1)
    found: list[Path] = []
    deadline = time.monotonic() + 60
    while not found and time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        found = [p for p in ws.runs.glob(".*") if p.is_dir() and any(p.glob("*.parquet"))]
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    ws.vars.update(parent=str(ws.runs), dead=found[0].name if found else "(no temporary appeared)", live="")


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextlib.contextmanager
def hold_live_lock(ws: Workspace, notes: list[str]) -> Iterator[None]:
    """Hold the flock of the 'live' temporary directory's lock while the command runs."""
    import fcntl

    fd = os.open(ws.vars["live_lock"], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


STALE = [
    C(
        "stale-run-tmp-listed-and-cleaned",
        "stale temporaries",
        "runs",
        0,
        None,
        new=True,
        setup=_temporaries("runs", ".{run}.tmp", ".29991231-235959-census-tiny-llama-beef.tmp"),
        patches=(hold_live_lock,),
        check=check_stale_removed,
    ),
    C(
        "killed-mid-save-then-runs",
        "stale temporaries",
        "runs",
        0,
        r"\(no runs\)",
        new=True,
        setup=_killed_mid_save,
        check=check_stale_removed,
    ),
    C(
        "stale-cache-tmp-listed-and-cleaned",
        "stale temporaries",
        "models",
        0,
        None,
        new=True,
        setup=_temporaries("cache/models", ".smollm2-135m.tmp-dead0001", ".gemma3-270m.tmp-live0001"),
        patches=(hold_live_lock,),
        check=check_stale_removed,
    ),
]

CLI_CASES: list[Case] = [*BAD_SETS, *INPUTS, *RUN_REFERENCES, *DAMAGED, *SYMLINKS, *SAVING, *MODELS, *STALE]


def judge(case: Case, outcome: Outcome, new_paths: Sequence[str]) -> list[str]:
    """Everything wrong with ``outcome`` for ``case`` (empty: it behaves as it must)."""
    problems = list(outcome.notes)
    if outcome.code != case.exit:
        problems.append(f"exit status {outcome.code}, expected {case.exit}")
    if "Traceback" in outcome.stderr or any(
        line.startswith('  File "') for line in outcome.stderr.splitlines()
    ):
        problems.append("a traceback on stderr")
    lines = outcome.lines
    if case.exit != 0:
        if case.usage:
            if not any("--help" in line for line in lines):
                problems.append("the usage error does not point to --help")
        elif len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr, expected one: {lines[:3]}")
        elif not re.match(case.prefix, lines[0]):
            problems.append(f"the message does not start with /{case.prefix}/")
        message = "\n".join(lines)
    else:
        message = outcome.stdout
    if case.phrase is not None and not re.search(case.phrase, message, re.DOTALL):
        problems.append(f"the message lacks /{case.phrase}/")
    if case.forbid is not None and re.search(case.forbid, message):
        problems.append(f"the message says /{case.forbid}/")
    allowed = [*case.leaves, *([RUN_SAVED] if case.exit == 0 and case.argv.startswith("run ") else [])]
    stray = [p for p in new_paths if not any(re.fullmatch(a, p) for a in allowed)]
    if stray:
        problems.append(f"left behind: {', '.join(sorted(stray)[:5])}")
    return problems


def run_case(case: Case, base: Path, shared: Shared) -> tuple[Outcome, list[str]]:
    """Set up ``case`` in a fresh workspace under ``base``, run it, judge it."""
    ws = Workspace.make(base, shared)
    if case.setup is not None:
        case.setup(ws)
    argv = [part.format_map(ws.vars) for part in shlex.split(case.argv)]
    before = snapshot(base)
    if case.process:
        outcome = run_process(argv, ws, interrupt_after=case.interrupt_after)
    else:
        outcome = run_cli(argv, ws, case.patches)
    new_paths = sorted(snapshot(base) - before)
    problems = judge(case, outcome, new_paths)
    if case.check is not None:
        problems += case.check(ws, outcome)
    return outcome, problems


# ------------------------------------------------------------------------------------- API cases


_MODELS: dict[str, Any] = {}


def _has_hooks(model: Any) -> bool:
    points = model.bridge.hook_dict.values()
    modules = [*model.hf_model.modules(), *model.native_model.modules()]
    return any(p.fwd_hooks or p._forward_hooks for p in points) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules
    )


def _model(name: str) -> Any:
    """A tiny model shared by the API cases, built again if a case left anything on it."""
    import probe

    if name not in _MODELS or _has_hooks(_MODELS[name]):
        _MODELS[name] = probe.load_model(name, device="cpu")
    return _MODELS[name]


def _evict(name: str) -> None:
    _MODELS.pop(name, None)


def model_state(model: Any) -> dict[str, Any]:
    """Everything an error could leave changed: hook handles, torch hooks, kernels, mode, weights
    (as bytes, so that equal means bit-identical)."""
    state: dict[str, Any] = {}
    for name, point in model.bridge.hook_dict.items():
        state[f"point {name}"] = ([id(h) for h in point.fwd_hooks], list(point._forward_hooks))
    for label, module in (("hf", model.hf_model), ("native", model.native_model)):
        for name, sub in module.named_modules():
            hooks = [*sub._forward_hooks, *sub._forward_pre_hooks, *getattr(sub, "_backward_hooks", {})]
            if hooks:
                state[f"{label} hooks {name}"] = hooks
        state[f"{label} attention"] = getattr(module.config, "_attn_implementation", None)
        state[f"{label} training"] = module.training
    for name, tensor in model.hf_model.state_dict().items():
        state[f"weight {name}"] = (
            str(tensor.dtype),
            tuple(tensor.shape),
            tensor.detach().cpu().numpy().tobytes(),
        )
    return state


def state_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


_TEXTS = ["the quick brown fox", "a lazy dog"]
_OTHER = ["jumps over the cat", "sleeps on a mat!!"]


class Boom(Exception):
    """The error raised inside the block."""


def _interventions() -> dict[str, Callable[[Any, Any], contextlib.AbstractContextManager[Any]]]:
    from probe import interventions as iv

    def patch_resid(m: Any, other: Any) -> contextlib.AbstractContextManager[Any]:
        name = "blocks.1.hook_resid_pre"
        return iv.patch_activation(m, name, iv.cache_activations(m, other, [name])[name], positions=[-1])

    return {
        "edit_pattern": lambda m, other: iv.edit_pattern(m, {(1, 2): lambda p: p.flip(-1).tril()}),
        "scale_heads": lambda m, other: iv.scale_heads(m, {(0, 1): 0.0, (2, 3): 3.0}),
        "uniform_attention": lambda m, other: iv.uniform_attention(m, [(0, 0), (1, 1)]),
        "patch_activation": patch_resid,
        "freeze_heads": lambda m, other: iv.freeze_heads(m, [(0, 2), (1, 0)], iv.cache_z(m, other)),
        "compose": lambda m, other: iv.compose(
            iv.scale_heads(m, {(1, 1): 0.5}), iv.uniform_attention(m, [(2, 0)])
        ),
    }


def hooks_after_error(model_name: str, kind: str) -> Callable[[Workspace], list[str]]:
    """An error inside a capture or an intervention leaves no hook and a bit-identical model."""

    def probe_case(ws: Workspace) -> list[str]:
        import torch

        from probe import capture as capture_module
        from probe import hooks
        from probe.reducers import RowEntropy

        model = _model(model_name)
        batch = model.encode(_TEXTS + _OTHER)
        ids, other = batch.input_ids[:2], batch.input_ids[2:]
        with torch.no_grad():
            clean = model.bridge(ids)
        before = model_state(model)
        problems = []

        class Exploding(RowEntropy):
            def update(self, layer: int, *args: Any, **kwargs: Any) -> None:
                if layer == 1:
                    raise Boom("reducer failed")
                super().update(layer, *args, **kwargs)

            def update_moments(self, layer: Any, *args: Any, **kwargs: Any) -> None:
                if layer == 1 or isinstance(layer, slice):
                    raise Boom("reducer failed")
                super().update_moments(layer, *args, **kwargs)

        rows = [[5 + i for i in range(12)], [40 + i for i in range(7)]]
        try:
            if kind in ("capture-eager", "capture-recompute"):
                mode = kind.split("-")[1]
                capture_module.capture(model, rows, [Exploding()], mode=mode, batch_size=2, progress=False)  # type: ignore[arg-type]
            elif kind == "hook-fn-raises":
                with hooks.hooks(model, [("blocks.1.attn.hook_pattern", _raise_boom)]), torch.no_grad():
                    model.bridge(ids)
            else:
                with _interventions()[kind](model, other), torch.no_grad():
                    model.bridge(ids)
                    raise Boom("error inside the block")
            problems.append("the error did not propagate")
        except Boom:
            pass
        changed = state_differences(before, model_state(model))
        if changed:
            problems.append(f"changed after the error: {', '.join(changed[:4])}")
            _evict(model_name)
        with torch.no_grad():
            if not torch.equal(model.bridge(ids), clean):
                problems.append("the logits differ after the error")
        return problems

    return probe_case


def _raise_boom(activation: Any, hook: Any) -> None:
    raise Boom("hook failed")


def padding(model_name: str, mode: str) -> Callable[[Workspace], list[str]]:
    """A sequence alone and the same sequence left-padded in a batch give the same statistics."""

    def probe_case(ws: Workspace) -> list[str]:
        import torch

        from probe.capture import capture
        from probe.reducers import ColumnImportance, DiagonalScore, MeanDistance, RowEntropy

        model = _model(model_name)
        gen = torch.Generator().manual_seed(0)
        rows = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (40, 9, 25)]
        batched = [RowEntropy(), MeanDistance(), DiagonalScore(1), ColumnImportance()]
        alone = [RowEntropy(), MeanDistance(), DiagonalScore(1), ColumnImportance()]
        capture(model, rows, batched, mode=mode, batch_size=3, progress=False)  # type: ignore[arg-type]
        capture(model, rows[1:2], alone, mode=mode, batch_size=1, progress=False)  # type: ignore[arg-type]
        problems = []
        for a, b in zip(alone, batched, strict=True):
            single, padded = a.result()[0], b.result()[1]
            padded = padded[..., : single.shape[-1]] if single.dim() == 3 else padded
            if not torch.allclose(single, padded, atol=1e-5, equal_nan=True):
                problems.append(
                    f"{a.name}: alone and padded differ by {(single - padded).abs().nan_to_num().max():.2e}"
                )
        return problems

    return probe_case


@functools.cache
def reference_continuation(
    model_name: str, prompt: str = "The capital of France is", new_tokens: int = 8
) -> str:
    """Greedy continuation by transformers' own ``generate`` on a separately built copy of the weights."""
    from probe.tiny import TINY_BUILDERS

    model = _model(model_name)
    reference, tokenizer = TINY_BUILDERS[model_name].build(0, ())
    batch = model.encode([prompt])
    out = reference.generate(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return str(tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True))


def generation(model_name: str) -> Callable[[Workspace], list[str]]:
    """The sanity check's greedy continuation equals transformers' ``generate`` on the same weights."""

    def probe_case(ws: Workspace) -> list[str]:
        from probe.sanity import sanity_check

        model = _model(model_name)
        report = sanity_check(model)
        batch = model.encode([report.prompt])
        native = model.native_model.generate(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
        expected = model.tokenizer.decode(native[0, batch.input_ids.shape[1] :], skip_special_tokens=True)
        problems = []
        if report.continuation != expected:
            problems.append(f"sanity gives {report.continuation!r}, native generate {expected!r}")
        reference = reference_continuation(model_name)
        if report.continuation != reference:
            problems.append(
                f"sanity gives {report.continuation!r}, a separate transformers model {reference!r}"
            )
        return problems

    return probe_case


def _dashboard_client(ws: Workspace) -> Any:
    from dashboard.app import create_app

    ws.put_run()
    return create_app(ws.runs).server.test_client()


def dashboard_host_header(ws: Workspace) -> list[str]:
    client = _dashboard_client(ws)
    problems = []
    for host in ("evil.example", "evil.example:8050", "127.0.0.1.evil.example"):
        status = client.get("/", headers={"Host": host}).status_code
        if status != 400:
            problems.append(f"Host: {host} answered {status}, expected 400")
    for host in ("127.0.0.1:8050", "localhost:8050"):
        status = client.get("/", headers={"Host": host}).status_code
        if status != 200:
            problems.append(f"Host: {host} answered {status}, expected 200")
    return problems


def dashboard_security_headers(ws: Workspace) -> list[str]:
    client = _dashboard_client(ws)
    headers = client.get("/", headers={"Host": "127.0.0.1:8050"}).headers
    problems = []
    if headers.get("X-Content-Type-Options", "").lower() != "nosniff":
        problems.append("no X-Content-Type-Options: nosniff")
    framing = headers.get("X-Frame-Options", "") + headers.get("Content-Security-Policy", "")
    if not re.search(r"(?i)deny|sameorigin|frame-ancestors", framing):
        problems.append("no X-Frame-Options or CSP frame-ancestors (the page can be framed)")
    if not headers.get("Referrer-Policy"):
        problems.append("no Referrer-Policy")
    return problems


def dashboard_long_run_name(ws: Workspace) -> list[str]:
    """A 5,000-character run name in the URL and in the census page's run picker: a message, not a 500."""
    from dashboard.app import create_app

    ws.put_run()
    app = create_app(ws.runs)
    client = app.server.test_client()
    name = "a" * 5000
    requests = {
        "the URL ?run=": _callback_request(
            app, "page-content.children", {("url", "pathname"): "/census", ("url", "search"): f"?run={name}"}
        ),
        "the run picker": _callback_request(
            app,
            "census-heatmap.figure",
            {("census-run", "value"): name, ("census-metric", "value"): "entropy"},
        ),
    }
    problems = []
    for where, payload in requests.items():
        logging.disable(logging.CRITICAL)  # a server logs a failed callback's traceback: not what is judged
        try:
            response = client.post(
                "/_dash-update-component", json=payload, headers={"Host": "127.0.0.1:8050"}
            )
        finally:
            logging.disable(logging.NOTSET)
        if response.status_code != 200:
            problems.append(f"a 5,000-character run name in {where} answered {response.status_code}")
        elif not re.search(
            r"(?i)no run|not found|unknown run|pick one|too long|ignored", response.get_data(as_text=True)
        ):
            problems.append(f"a 5,000-character run name in {where}: the page does not say it names no run")
    return problems


def _callback_request(app: Any, output: str, values: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """The body a browser posts to Dash for the callback that updates ``output`` ("element.property"),
    with the given input values (others None)."""
    key = next(
        k for k in app.callback_map if k == output or f"..{output}.." in k or k.startswith(f"{output}@")
    )
    spec = app.callback_map[key]
    if key.startswith(".."):  # several outputs: "..a.children...b.children.."
        names = key.strip(".").split("...")
        outputs: Any = [dict(zip(("id", "property"), n.rsplit(".", 1), strict=True)) for n in names]
    else:
        outputs = dict(zip(("id", "property"), key.split("@")[0].rsplit(".", 1), strict=True))
    inputs = [{**i, "value": values.get((i["id"], i["property"]))} for i in spec["inputs"]]
    state = [{**i, "value": values.get((i["id"], i["property"]))} for i in spec.get("state", [])]
    changed = [f"{i}.{p}" for i, p in values]
    return {
        "output": key,
        "outputs": outputs,
        "inputs": inputs,
        "changedPropIds": changed[:1],
        "state": state,
    }


@dataclass(frozen=True)
class ApiCase:
    id: str
    family: str
    probe: Callable[[Workspace], list[str]]
    new: bool = False


INTERVENTION_KINDS = (
    "edit_pattern",
    "scale_heads",
    "uniform_attention",
    "patch_activation",
    "freeze_heads",
    "compose",
)

API_CASES: list[ApiCase] = [
    *(
        ApiCase(f"hooks-{m}-{k}", "hooks after exceptions", hooks_after_error(m, k))
        for m, kinds in (
            ("tiny-llama", (*INTERVENTION_KINDS, "capture-eager", "capture-recompute", "hook-fn-raises")),
            ("tiny-gpt2", ("scale_heads", "compose", "capture-recompute", "hook-fn-raises")),
        )
        for k in kinds
    ),
    *(
        ApiCase(f"padding-{m}-{mode}", "padding", padding(m, mode))
        for m in ("tiny-llama", "tiny-gpt2")
        for mode in ("eager", "recompute")
    ),
    ApiCase("generation-tiny-llama", "generation", generation("tiny-llama"), new=True),
    ApiCase("generation-tiny-gpt2", "generation", generation("tiny-gpt2"), new=True),
    ApiCase("dashboard-host-header", "dashboard", dashboard_host_header, new=True),
    ApiCase("dashboard-security-headers", "dashboard", dashboard_security_headers, new=True),
    ApiCase("dashboard-long-run-name", "dashboard", dashboard_long_run_name, new=True),
]


def run_api_case(case: ApiCase, base: Path, shared: Shared) -> tuple[Outcome, list[str]]:
    ws = Workspace.make(base, shared)
    t0 = time.perf_counter()
    try:
        problems = case.probe(ws)
    except BaseException as err:  # a crash is a finding, not the end of the table
        if isinstance(err, KeyboardInterrupt):
            raise
        problems = [f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]
    return Outcome(0, "", "", time.perf_counter() - t0), problems


# ------------------------------------------------------------------------------------- shared setup


def build_shared(base: Path) -> Shared:
    """The shared census run (through the CLI) and the saved tiny checkpoint."""
    from probe import zoo
    from probe.tiny import TINY_BUILDERS

    base.mkdir(parents=True, exist_ok=True)
    placeholder = Shared(base, base, base, b"")
    ws = Workspace.make(base / "build", placeholder)
    outcome = run_cli(shlex.split(TINY_RUN), ws)
    runs = [p for p in ws.runs.iterdir() if not p.name.startswith(".")]
    if outcome.code != 0 or len(runs) != 1:
        raise RuntimeError(f"could not build the shared run: {outcome.stderr[-2000:]}")
    run = base / runs[0].name
    shutil.move(runs[0], run)
    checkpoint = base / "tiny-llama-checkpoint"
    model, tokenizer = TINY_BUILDERS["tiny-llama"].build(0, ())
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    paths = zoo.weight_paths(zoo.CATALOGUE["smollm2-135m"])
    if paths is not None:
        with paths[0].open("rb") as fh:
            head = fh.read(1 << 20)  # a real GGUF file cut short
    else:
        head = b"GGUF" + (3).to_bytes(4, "little") + (300).to_bytes(8, "little") + (30).to_bytes(8, "little")
    shutil.rmtree(base / "build")
    return Shared(base, run, checkpoint, head)


ALL_IDS = [c.id for c in CLI_CASES] + [c.id for c in API_CASES]


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run the fault table and print what each case does.")
    parser.add_argument("--only", default="", help="only cases whose id contains this")
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    parser.add_argument("--json", help="also write the outcomes as JSON to this file")
    args = parser.parse_args(argv)
    import analyses
    import probe

    print(f"code under test: {Path(probe.__file__).parent.parent} ({Path(analyses.__file__).parent.parent})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="headlab-faults-") as tmp:
        shared = build_shared(Path(tmp) / "shared")
        for i, case in enumerate([*CLI_CASES, *API_CASES]):
            if args.only not in case.id:
                continue
            base = Path(tmp) / f"case{i}"
            try:
                if isinstance(case, Case):
                    outcome, problems = run_case(case, base, shared)
                    shown = outcome.first_line or (outcome.stdout.strip().splitlines() or [""])[0]
                    code = str(outcome.code)
                else:
                    outcome, problems = run_api_case(case, base, shared)
                    shown, code = "", "-"
            except Exception as err:  # a case whose setup needs what this code lacks
                outcome, shown, code = Outcome(-1, "", "", 0.0), "", "?"
                problems = [f"the case could not run: {type(err).__name__}: {err}"]
            shutil.rmtree(base, ignore_errors=True)
            verdict = "PASS" if not problems else "FAIL"
            rows.append(
                {
                    "id": case.id,
                    "family": case.family,
                    "new": case.new,
                    "exit": code,
                    "verdict": verdict,
                    "stderr": shown,
                    "problems": problems,
                    "seconds": round(outcome.seconds, 2),
                }
            )
            print(f"{verdict}  {case.id:<44} exit {code:>3}  {shown[:150]}")
            for problem in problems:
                print(f"      - {problem[:200]}")
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    print(f"{len(rows) - len(failed)}/{len(rows)} cases behave as they must")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.markdown:
        lines = [
            "| case | family | fault | exit | verdict | first line of stderr / problem |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            detail = r["stderr"] if r["verdict"] == "PASS" else "; ".join(r["problems"])
            detail = detail.replace("|", "\\|")[:240]
            lines.append(
                f"| {r['id']} | {r['family']} | {'new' if r['new'] else 'old'} | {r['exit']} | {r['verdict']} | {detail} |"
            )
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
