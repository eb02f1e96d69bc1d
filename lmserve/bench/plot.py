"""Plots of `bench serve` results: throughput vs concurrency and latency percentiles.

matplotlib is imported here only, lazily, so the bench runs without it (`pip install lmserve[bench]`).
"""
from __future__ import annotations


def plot_results(results: list[dict], path: str) -> None:
    """One line per result (a saved `--save-result` dict: settings + runs), several panels in one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullLocator
    except ImportError:
        raise SystemExit("bench: --plot needs matplotlib (pip install 'lmserve[bench]')") from None

    panels = [("output_throughput", None, "output tokens/s"),
              ("ttft_ms", "median", "TTFT p50 (ms)"), ("ttft_ms", "p99", "TTFT p99 (ms)"),
              ("tpot_ms", "median", "TPOT p50 (ms)"), ("e2e_ms", "median", "E2E p50 (ms)"),
              ("e2e_ms", "p99", "E2E p99 (ms)")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    levels: set[int] = set()
    for res in results:
        runs = sorted(res["runs"], key=lambda r: r["metrics"].get("max_concurrency") or 0)
        xs = [r["metrics"].get("max_concurrency") or 0 for r in runs]
        levels.update(xs)
        label = res["settings"].get("label") or res["settings"].get("model", "?")
        for ax, (key, stat, _) in zip(axes.flat, panels):
            ys = [r["metrics"][key][stat] if stat else r["metrics"][key] for r in runs]
            ax.plot(xs, ys, marker="o", label=label)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for i, (ax, (_, _, ylabel)) in enumerate(zip(axes.flat, panels)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(levels))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(plain)
        if i > 0:  # latencies of different servers differ by orders of magnitude
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    s = results[0]["settings"] if results else {}
    fig.suptitle(f"lmserve bench serve: {s.get('dataset')} input {s.get('input_len')} / output {s.get('output_len')}"
                 f" tokens{', ignore_eos' if s.get('ignore_eos') else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
