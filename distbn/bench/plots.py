"""PNG plots of benchmark results, when matplotlib is importable (the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_plots"]


def _shape(params) -> str:
    return "×".join(str(d) for d in params.get("shape", [])) or "–"


def write_plots(results: dict, out_dir) -> list[Path]:
    """PNG plots (allreduce latency, scaling, kernel bandwidth) when matplotlib is importable.

    Args:
        results: {"environment", "records"}.
        out_dir: where the PNGs go.

    Returns:
        The files written; [] without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir = Path(out_dir)
    records = results["records"]
    written = []

    lat = [r for r in records if r["name"].startswith("allreduce.") and r["metric"] == "latency"]
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        for ws in sorted({r["world_size"] for r in lat}):
            pts = sorted((r["params"]["bytes"], r["value"]) for r in lat if r["world_size"] == ws)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"n={ws}")
        ax.set(xscale="log", yscale="log", xlabel="message bytes", ylabel="latency (µs)",
               title="Allreduce latency")
        ax.legend()
        written.append(_save(fig, plt, out_dir / "allreduce.png"))

    thr = [r for r in records if r["name"] == "scaling.step" and r["metric"] == "throughput"]
    if thr:
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = sorted((r["world_size"], r["value"]) for r in thr)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="measured")
        base = [v for n, v in pts if n == 1]
        if base:
            ax.plot([p[0] for p in pts], [p[0] * base[0] for p in pts], ls="--", label="ideal")
        ax.set(xlabel="ranks", ylabel="samples/s", title="Training throughput")
        ax.legend()
        written.append(_save(fig, plt, out_dir / "scaling.png"))

    bw = [r for r in records if r["name"].startswith("kernel.") and r["name"] != "kernel.copy"
          and r["metric"] in ("bandwidth", "torch_bandwidth")]
    if bw:
        short = {"forward": "fwd", "backward": "bwd", "forward_backward": "fwd+bwd"}

        def label(r):
            p = r["params"]
            return f"{short.get(r['name'].split('.')[1], r['name'])} {_shape(p)} {p.get('dtype')}"

        labels = list(dict.fromkeys(label(r) for r in bw))
        fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.6), 5))
        for j, metric in enumerate(("bandwidth", "torch_bandwidth")):
            vals = {label(r): r["value"] for r in bw if r["metric"] == metric}
            ax.bar([i + j * 0.4 for i in range(len(labels))],
                   [vals.get(lb, 0) for lb in labels], width=0.4,
                   label="distbn" if metric == "bandwidth" else "torch")
        copy = [r["value"] for r in records if r["name"] == "kernel.copy"]
        if copy:
            ax.axhline(copy[0], color="k", ls="--", label="np.copyto")
        ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, fontsize=7, rotation=40,
                      ha="right")
        ax.set(ylabel="effective GB/s", title="BatchNormalization kernels")
        ax.legend()
        written.append(_save(fig, plt, out_dir / "kernel.png"))
    return written


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
