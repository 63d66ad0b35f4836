"""Perplexity results as a markdown table and a PNG plot (the plot needs matplotlib, the ``train`` extra)."""

from __future__ import annotations

import sys
from pathlib import Path

Results = dict[str, dict[int, float]]  # method name -> context length -> perplexity


def markdown_table(results: Results, base_len: int) -> str:
    lengths = sorted({length for row in results.values() for length in row})
    header = "| method | " + " | ".join(f"{length} ({length // base_len}x)" for length in lengths) + " |"
    lines = [header, "| --- |" + " --- |" * len(lengths)]
    for name, row in results.items():
        cells = [f"{row[length]:.2f}" if length in row else "" for length in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(results: Results, base_len: int, path: Path) -> bool:
    """Perplexity against context length, log-log; False (and a note on stderr) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'clex-serve[train]'); skipping the plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, row in results.items():
        lengths = sorted(row)
        axes.plot(lengths, [row[length] for length in lengths], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.axvline(base_len, color="grey", linestyle=":", label=f"training length {base_len}")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("held-out perplexity")
    axes.set_title("Train short, test long: CLEX vs RoPE scalings")
    axes.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
