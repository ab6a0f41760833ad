"""The atlas's typed config."""

from __future__ import annotations

from dataclasses import dataclass

from probe.errors import ConfigError


@dataclass
class AtlasConfig:
    """How the atlas of one model is built from the run store.

    ``runs`` names runs to use (ids or paths) instead of the latest of their analysis; ``root`` is
    the run store read (empty: ``--root``, else ``$HEADLAB_RUNS``, else ``./runs``); ``top_multi``
    how many heads with several roles the findings list; ``depth_bins`` the relative-depth bins of
    the model comparison; ``min_heads`` the fewest heads a role needs before its rank correlation
    and overlap are reported as findings.
    """

    runs: tuple[str, ...] = ()
    root: str = ""
    top_multi: int = 20
    depth_bins: int = 5
    min_heads: int = 2

    def validate(self) -> None:
        if not isinstance(self.top_multi, int) or self.top_multi < 1:
            raise ConfigError(
                f"top_multi must be an integer >= 1, got {self.top_multi!r}; e.g. --set top_multi=20"
            )
        if not isinstance(self.depth_bins, int) or not 1 <= self.depth_bins <= 20:
            raise ConfigError(
                f"depth_bins must be an integer in 1..20, got {self.depth_bins!r}; e.g. --set depth_bins=5"
            )
        if not isinstance(self.min_heads, int) or self.min_heads < 1:
            raise ConfigError(f"min_heads must be an integer >= 1, got {self.min_heads!r}")
