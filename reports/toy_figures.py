"""Figure of the toy mechanism: per-layer sample variance along the generative pass (log scale), per coupling."""
from __future__ import annotations

from pathlib import Path


def plot_layer_variance(result: dict, path) -> Path:
    """One panel per coupling; one line per condition y and coordinate; the paper's Fig. 3b layout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    couplings = result["couplings"]
    fig, axes = plt.subplots(1, len(couplings), figsize=(6 * len(couplings), 4), sharey=True)
    for ax, (name, r) in zip(axes, couplings.items()):
        for y, row in r["conditions"].items():
            var = list(zip(*row["variance"]))
            ood = abs(float(y)) > 1
            for i, v in enumerate(var):
                ax.plot(range(len(v)), v, ls="-" if i == 0 else "--", lw=1.5 if ood else 1,
                        label=f"y={float(y):g} x{i + 1}" + (" (OOD)" if ood else ""))
        ax.set_yscale("log")
        ax.set_xticks(range(len(row["layers"])), row["layers"], rotation=60, fontsize=7)
        ax.set_title(f"{name}: sample variance per layer (generative order)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("variance")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
