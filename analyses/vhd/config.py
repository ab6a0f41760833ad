"""What VHD and VHR evaluate: the VHR settings, the run's config and the layer sets.

See docs/analyses/vhd.md for the settings and their defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from analyses import validation as va
from analyses.tasks import scene_captions as scc
from probe.errors import ConfigError


@dataclass(frozen=True)
class VhrSetting:
    """One way to reinforce heads: ``alpha``, ``layers`` (see :func:`parse_layers`), outlier removal,
    and ``random=True`` for the control that scales as many heads per layer, drawn at random.
    ``alpha`` below 1 suppresses the selected heads instead (the converse control; 0 removes them)."""

    name: str
    alpha: float = 2.0
    layers: str = "paper"
    outlier_removal: bool = True
    random: bool = False

    def validate(self) -> None:
        if not self.alpha >= 0:
            raise ConfigError(f"VHR setting {self.name!r}: alpha must be 0 or more, got {self.alpha!r}")
        if not self.name or self.name == BASELINE:
            raise ConfigError(f"a VHR setting needs a name other than {BASELINE!r}")


PAPER_PROMPT = "Please help me describe the image in detail."
"""He et al.'s caption prompt for CHAIR (LLaVA-1.5's detailed-description prompt)."""
BASELINE = "baseline"
MAIN = "vhr"
DEFAULT_SETTINGS: tuple[VhrSetting, ...] = (
    VhrSetting(MAIN),
    VhrSetting("alpha=1.5", alpha=1.5),
    VhrSetting("alpha=3", alpha=3.0),
    VhrSetting("layers=all", layers="all"),
    VhrSetting("layers=last:14", layers="last:14"),
    VhrSetting("no outlier removal", outlier_removal=False),
    VhrSetting("random heads", random=True),
)


Sweep = Literal["off", "cross", "grid"]
SWEEP_ALPHAS = (0.5, 1.1, 1.25, 1.5, 2.0)
SWEEP_LAYERS = ("paper", "early", "middle", "late")


@dataclass(frozen=True)
class VhdConfig:
    """What :func:`run_vhd` and :func:`run_vhr` evaluate.

    ``n_scenes`` held-out scenes of ``split`` (``conflict`` or ``iid``) with Gaussian pixel noise of
    std ``noise`` (0–255 scale; 0: clean). ``top_k``: heads per layer summed by T-VHD. ``settings``:
    the VHR settings (:class:`VhrSetting`; the first is the main one; ``run_vhd`` runs none;
    ``ablations=False`` runs the main one only; ``pope_ablations=False`` asks POPE only without VHR
    and under the main setting).
    ``pope_per_scene`` present and as many absent classes per scene and kind (empty ``pope_kinds``:
    no POPE). ``n_display`` images are kept for the dashboard.
    ``sweep`` (``vhr`` only): ``cross`` runs every ``sweep_alphas`` at the main setting's layers and
    every ``sweep_layers`` at its alpha, ``grid`` every pair, ``off`` none (the ``sweep`` table).
    ``validation`` (``vhr`` only): the heads the main setting selects on most evaluated scenes, scaled
    by each of ``validation_scales`` on ``held_out_scenes`` further scenes, against ``n_null``
    random same-size sets of the same layers (the ``validation`` table).
    """

    n_scenes: int = 100
    split: str = "conflict"
    noise: float = 50.0
    prompt: str = PAPER_PROMPT
    max_new_tokens: int = 64
    top_k: int = 3
    settings: tuple[VhrSetting, ...] = DEFAULT_SETTINGS
    pope_kinds: tuple[str, ...] = scc.POPE_KINDS
    pope_per_scene: int = 2
    pope_max_new_tokens: int = 3
    n_stats: int = 20000
    batch_size: int = 16
    n_boot: int = 1000
    alpha_ci: float = 0.05
    n_display: int = 8
    ablations: bool = True
    pope_ablations: bool = True
    sweep: Sweep = "cross"
    sweep_alphas: tuple[float, ...] = SWEEP_ALPHAS
    sweep_layers: tuple[str, ...] = SWEEP_LAYERS
    validation: bool = True
    held_out_scenes: int = 20
    n_null: int = 50
    validation_scales: tuple[float, ...] = (0.0, 2.0)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        ints = {
            "n_scenes": self.n_scenes,
            "max_new_tokens": self.max_new_tokens,
            "top_k": self.top_k,
            "pope_per_scene": self.pope_per_scene,
            "pope_max_new_tokens": self.pope_max_new_tokens,
            "n_stats": self.n_stats,
            "batch_size": self.batch_size,
            "n_boot": self.n_boot,
            "held_out_scenes": self.held_out_scenes,
        }
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.split not in ("conflict", "iid"):
            raise ConfigError(f"split must be 'conflict' or 'iid', got {self.split!r}")
        if not 0 <= self.noise <= 255:
            raise ConfigError(f"noise is a pixel std on the 0-255 scale; got {self.noise!r}")
        if not 0 < self.alpha_ci < 1:
            raise ConfigError(f"alpha_ci must be in (0, 1), got {self.alpha_ci!r}")
        bad = [k for k in self.pope_kinds if k not in scc.POPE_KINDS]
        if bad:
            raise ConfigError(f"unknown POPE kinds {bad}; choose from {', '.join(scc.POPE_KINDS)}")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ConfigError(f"VHR setting names must be unique, got {names}")
        for setting in self.settings:
            setting.validate()
        if self.sweep not in ("off", "cross", "grid"):
            raise ConfigError(f"sweep must be off, cross or grid, got {self.sweep!r}")
        if self.sweep != "off" and not (self.sweep_alphas and self.sweep_layers):
            raise ConfigError("a sweep needs at least one of sweep_alphas and of sweep_layers")
        for a in (*self.sweep_alphas, *self.validation_scales):
            if not a >= 0:
                raise ConfigError(f"sweep_alphas and validation_scales must be 0 or more, got {a!r}")
        if self.validation:
            va.check_null(self.n_null, key="n_null")
            if not self.validation_scales:
                raise ConfigError("validation=True needs at least one of validation_scales (e.g. 0,2)")
            if 1.0 in self.validation_scales:
                raise ConfigError("validation_scales: a scale of 1 changes nothing; use e.g. 0 or 2")


THIRDS = ("early", "middle", "late")


def parse_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Layers named by ``spec``: ``"paper"`` (1 and the last 14), ``"all"``, ``"early"``,
    ``"middle"`` or ``"late"`` (a third of the layers: ``i * n // 3`` up to ``(i + 1) * n // 3``),
    ``"last:N"``, ``"first:N"``, ``"1,5,9"`` or a list of indices; sorted, each once."""
    if not isinstance(spec, str):
        chosen = [int(x) for x in spec]
    elif spec in THIRDS:
        i = THIRDS.index(spec)
        chosen = list(range(i * n_layers // 3, (i + 1) * n_layers // 3))
    elif spec == "paper":
        chosen = [1, *range(max(0, n_layers - 14), n_layers)]
    elif spec == "all":
        chosen = list(range(n_layers))
    elif spec.startswith(("last:", "first:")):
        kind, _, number = spec.partition(":")
        if not number.isdigit() or int(number) < 1:
            raise ConfigError(f"layers {spec!r}: give a positive count, e.g. last:14")
        k = min(int(number), n_layers)
        chosen = list(range(n_layers - k, n_layers)) if kind == "last" else list(range(k))
    else:
        try:
            chosen = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"layers {spec!r}: use paper, all, early, middle, late, last:N, first:N "
                "or a comma list of indices"
            ) from None
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad or not chosen:
        raise ConfigError(
            f"layers {spec!r} name {bad or 'no layers'}; the model has layers 0 to {n_layers - 1}"
        )
    return sorted(set(chosen))


def _fmt(alpha: float) -> str:
    return f"{alpha:g}"


def sweep_settings(cfg: VhdConfig) -> list[VhrSetting]:
    """The sweep's settings, each named ``alpha=A layers=L``: with ``cross``, every alpha at the main
    setting's layers, then every layer set at its alpha; with ``grid``, every pair (each once)."""
    if cfg.sweep == "off":
        return []
    main = cfg.settings[0]
    if cfg.sweep == "grid":
        pairs = [(a, layers) for layers in cfg.sweep_layers for a in cfg.sweep_alphas]
    else:
        pairs = [(a, main.layers) for a in cfg.sweep_alphas]
        pairs += [(main.alpha, layers) for layers in cfg.sweep_layers]
    out: list[VhrSetting] = []
    seen: set[tuple[float, str]] = set()
    for alpha, layers in pairs:
        if (alpha, layers) in seen:
            continue
        seen.add((alpha, layers))
        out.append(
            VhrSetting(
                f"alpha={_fmt(alpha)} layers={layers}",
                alpha=alpha,
                layers=layers,
                outlier_removal=main.outlier_removal,
            )
        )
    return out
