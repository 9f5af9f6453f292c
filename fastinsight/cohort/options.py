"""``CohortOptions``: the settings of one cohort run (the flags of ``predict-cohort`` map onto
them). Errors name the field (``cpus_per_slide``); the CLI shows them as its flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastinsight.errors import ConfigError
from fastinsight.predict.slide import PredictOptions


@dataclass(frozen=True)
class CohortOptions:
    """Settings of one cohort run; the flags of ``fastinsight predict-cohort`` map onto these.

    ``predict`` holds the per-slide settings (its ``device`` and ``progress`` are decided per
    task); a manifest's mpp overrides ``predict.mpp`` for its slide. ``gpus_per_slide=None``
    means 1 when the Ray cluster has GPUs and 0 (CPU) otherwise; fractions share a GPU.
    ``num_cpus`` sizes a local Ray instance (default: every core) and is ignored on a cluster.
    """

    predict: PredictOptions = field(default_factory=lambda: PredictOptions(progress=False))
    class_: str | None = None
    encoding: str = "score"
    all_classes: bool = False
    backend: str = "auto"
    ray_address: str | None = None
    num_cpus: int | None = None
    cpus_per_slide: float = 1.0
    gpus_per_slide: float | None = None
    max_retries: int = 2
    progress: bool = True
    ray_temp_dir: str | None = None

    def __post_init__(self) -> None:
        if self.encoding not in ("score", "rgb"):
            raise ConfigError(
                f"encoding must be 'score' or 'rgb', got {self.encoding!r}", fields=("encoding",)
            )
        if not self.cpus_per_slide > 0:
            raise ConfigError(
                f"cpus_per_slide must be > 0, got {self.cpus_per_slide}", fields=("cpus_per_slide",)
            )
        if self.gpus_per_slide is not None and self.gpus_per_slide < 0:
            raise ConfigError(
                f"gpus_per_slide must be >= 0, got {self.gpus_per_slide}",
                fields=("gpus_per_slide",),
            )
        if self.max_retries < 0:
            raise ConfigError(
                f"max_retries must be >= 0, got {self.max_retries}", fields=("max_retries",)
            )
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num_cpus must be >= 1, got {self.num_cpus}", fields=("num_cpus",))


__all__ = ["CohortOptions"]
