"""PNG plots of a suite run (matplotlib, Agg backend, so no display is needed): throughput and latency CDFs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

from loadtests.histogram import CDF_PERCENTILES, INSTALL_HINT
from loadtests.measure import Sample

if TYPE_CHECKING:
    from loadtests.suite import SuiteOptions


def require_matplotlib() -> Any:
    """pyplot on the Agg backend, or a clear error if matplotlib (the `bench` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError(f"the benchmark plots need matplotlib: {INSTALL_HINT}") from error
    return plt


def _json_series(samples: Sequence[Sample], model: str) -> dict[str, dict[int, list[Sample]]]:
    series: dict[str, dict[int, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        if s.model == model and s.body == "json" and s.requests > 0:
            series[s.variant][s.concurrency].append(s)
    return series


def throughput_plot(samples: Sequence[Sample], models: Sequence[str], labels: dict[str, str], path: Path) -> Path:
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for variant, by_c in sorted(_json_series(samples, model).items()):
            if len(by_c) < 2:
                continue  # a line needs two concurrencies
            cs = sorted(by_c)
            mid = [median(s.rps for s in by_c[c]) for c in cs]
            low = [m - min(s.rps for s in by_c[c]) for m, c in zip(mid, cs, strict=True)]
            high = [max(s.rps for s in by_c[c]) - m for m, c in zip(mid, cs, strict=True)]
            ax.errorbar(cs, mid, yerr=[low, high], marker="o", capsize=3, label=labels.get(variant, variant))
        ax.set_xscale("log", base=2)
        _label(ax, "concurrency (connections)", "requests/s (median, min–max)", f"{model}, JSON body")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _median_run(runs: list[Sample]) -> Sample:
    """The run whose throughput is the median: its whole CDF, rather than a blend of runs' percentiles."""
    return sorted(runs, key=lambda s: s.rps)[len(runs) // 2]


def cdf_plot(samples: Sequence[Sample], models: Sequence[str], concurrencies: Sequence[int],
             labels: dict[str, str], path: Path) -> Path:
    plt = require_matplotlib()
    fig, axes = plt.subplots(len(concurrencies), len(models), figsize=(6.5 * len(models), 4 * len(concurrencies)),
                             squeeze=False)
    quantiles = [p / 100 for p in CDF_PERCENTILES]
    for row, concurrency in enumerate(concurrencies):
        for col, model in enumerate(models):
            ax = axes[row][col]
            for variant, by_c in sorted(_json_series(samples, model).items()):
                if concurrency in by_c:
                    ax.plot(_median_run(by_c[concurrency]).cdf_ms, quantiles, label=labels.get(variant, variant))
            ax.set_xscale("log")
            _label(ax, "latency (ms)", "fraction of requests ≤ latency", f"{model}, JSON, c={concurrency} (median run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(samples: Sequence[Sample], options: SuiteOptions, directory: Path, stem: str) -> list[Path]:
    from loadtests.suite import LABELS

    models = [m for m in options.models if any(s.model == m for s in samples)]
    if not models:
        return []
    concurrencies = sorted(c for c in options.key_concurrencies if any(s.concurrency == c for s in samples))
    return [
        throughput_plot(samples, models, LABELS, directory / f"{stem}-throughput.png"),
        cdf_plot(samples, models, concurrencies or [samples[0].concurrency], LABELS,
                 directory / f"{stem}-latency-cdf.png"),
    ]
