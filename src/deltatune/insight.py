"""Looking inside adapters: where the rank (or, for sparse structures, the selected rows, columns or entries) went.

:func:`rank_grid` arranges per-module ranks as a (layer x module type) grid, reading the layer index from the
first purely numeric part of each module name (``encoder.layer.3.attention.self.query`` -> layer 3, type
``attention.self.query``); :func:`plot_ranks` draws it as a heatmap (``deltatune inspect ADAPTER --plot``).
"""
from __future__ import annotations

from pathlib import Path


def split_layer(module: str) -> tuple[int | None, str]:
    """``(layer index, module type)``; the index is ``None`` for modules outside the repeated blocks."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1:]) or ".".join(parts[:i])
    return None, module


def _stack(module: str) -> str:
    """The dotted path before the first numeric part (``down_blocks`` of ``down_blocks.0.resnets.0.conv1``)."""
    parts = module.split(".")
    return ".".join(parts[:next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))])


def rank_grid(ranks: dict[str, int]) -> tuple[list[int], list[str], list[list[float]]]:
    """``(layers, types, grid)`` with ``grid[i][j]`` the rank of type ``j`` in layer ``i`` (NaN where absent).
    Modules outside numbered blocks are left out. A model with several numbered stacks (a UNet's ``down_blocks``,
    ``up_blocks``) names each type with its stack (``down_blocks/resnets.0.conv1``), so no two modules share a cell."""
    numbered = {m: split_layer(m) for m in ranks if split_layer(m)[0] is not None}
    several = len({_stack(m) for m in numbered}) > 1
    cells = {}
    for module, (layer, kind) in numbered.items():
        cells[(layer, f"{_stack(module)}/{kind}" if several else kind)] = ranks[module]
    layers = sorted({layer for layer, _ in cells})
    types = sorted({kind for _, kind in cells})
    grid = [[float(cells.get((layer, kind), float("nan"))) for kind in types] for layer in layers]
    return layers, types, grid


def module_ranks(modules: dict[str, dict]) -> dict[str, int]:
    """``{module: size}`` for the modules of a saved adapter: the rank ``r`` of low-rank structures, else the number
    ``k`` of selected rows / columns (sliced) or entries (sparse)."""
    return {m: int(spec["r"] if "r" in spec else spec["k"]) for m, spec in modules.items() if "r" in spec or "k" in spec}


def plot_ranks(modules: dict[str, dict], path: str | Path, title: str = "rank per layer and module") -> Path:
    """Heatmap of the ranks of a saved adapter's modules (``AdapterRecord.modules``) written to ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError("plotting needs matplotlib: pip install 'deltatune[plot]'") from None
    layers, types, grid = rank_grid(module_ranks(modules))
    if not layers:
        raise ValueError("the adapter has no ranked modules inside numbered layers to plot")
    fig = Figure(figsize=(1.6 + 1.1 * len(types), 1.2 + 0.35 * len(layers)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(types)), [t.replace(".", ".\n") for t in types], fontsize=7)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set(xlabel="module", ylabel="layer", title=title)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{int(v)}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="rank" if any("r" in spec for spec in modules.values()) else "rows / columns / entries")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
