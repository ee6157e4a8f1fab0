"""One paper style for every figure: fonts, sizes, a fixed colour and label per method.

Every plotting function in analysis/ calls `use()` and takes colours/labels from here, so a method
has the same colour in the spectral, landscape and report figures.
"""
import matplotlib

matplotlib.use("Agg")  # figures are files; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

# Paper names, in the order the paper's tables list them (full FT, LoRA family, sparse variants).
METHOD_LABELS = {
    "fft": "Full FT", "head": "Head only",
    "lora": "LoRA", "lora_plus": "LoRA+", "asym": "Asym-LoRA", "cola": "CoLA", "rac": "RAC",
    "paca": "PaCA", "dpaca": "dPaCA",
    "cla": "cLA", "rcla": "random cLA", "c3la": "c3LA", "rc3la": "random c3LA",
}
METHOD_GROUPS = {
    "full FT": ["fft", "head"],
    "LoRA family": ["lora", "lora_plus", "asym", "cola", "rac", "paca", "dpaca"],
    "sparse variants": ["cla", "rcla", "c3la", "rc3la"],
}
_palette = plt.get_cmap("tab20").colors
METHOD_COLORS = {m: _palette[i % len(_palette)] for i, m in enumerate(METHOD_LABELS)}
# Chained methods are dashed so the chained/non-chained contrast of the paper reads at a glance.
CHAINED = {"cola", "rac", "c3la", "rc3la"}


def label(method):
    return METHOD_LABELS.get(method, method)


def color(method):
    return METHOD_COLORS.get(method, "0.3")


def linestyle(method):
    return "--" if method in CHAINED else "-"


def method_order(methods):
    """Sort method names in the paper's table order; unknown names go last, alphabetically."""
    order = list(METHOD_LABELS)
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


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
