"""One paper style for every figure: fonts, sizes, a fixed colour and line style per method.

Every plotting function in analysis/ calls `use()` and takes colours/labels from here, so a method
has the same colour in the spectral, landscape and report figures (labels and order: the registry's).
"""
import matplotlib

matplotlib.use("Agg")  # figures are files; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from adapters.methods import GROUPS, LABELS, METHODS, label, paper_order as method_order  # noqa: E402,F401

# Labels, groups and order are the registry's (adapters.methods); colours and line styles are the figures'.
METHOD_LABELS, METHOD_GROUPS = LABELS, GROUPS
_palette = plt.get_cmap("tab20").colors
METHOD_COLORS = {m: _palette[i % len(_palette)] for i, m in enumerate(METHOD_LABELS)}
# Chained methods are dashed so the chained/non-chained contrast of the paper reads at a glance.
CHAINED = {name for name, m in METHODS.items() if m.adapter is not None and m.adapter.chained}


def color(method):
    return METHOD_COLORS.get(method, "0.3")


def linestyle(method):
    return "--" if method in CHAINED else "-"


def use():
    plt.rcParams.update({
        "figure.figsize": (4.8, 3.4), "figure.dpi": 150, "savefig.bbox": "tight",
        "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7,
        "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
        "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "lines.linewidth": 1.4,
        "pdf.fonttype": 42,  # editable text in PDFs for camera-ready edits
    })


def save(fig, out_dir, stem, formats=("png", "pdf")):
    """Save `fig` as out_dir/stem.<fmt> for each format (atomically) and close it; return paths."""
    import os
    from pathlib import Path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        tmp = out_dir / f".{stem}.tmp.{fmt}"
        fig.savefig(tmp, format=fmt)
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths
