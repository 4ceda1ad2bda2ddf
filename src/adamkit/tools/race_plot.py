"""The race's picture: validation curves, their difference from fp32 AdamW, and per recipe the
final loss, step time, state bytes and peak memory, drawn from the race's JSON (``race.to_json``)
so that ``adamkit race --replot`` redraws a race written earlier. Needs matplotlib (the optional
``adamkit[plot]`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_MISSING = "race.png needs matplotlib: pip install 'adamkit[plot]' (or pip install matplotlib)"
REFERENCES = ("adamkit-adamw", "torch-adamw")  # the fp32 AdamW curve others are drawn against


def _reference(names: list[str]) -> str | None:
    return next((r for r in REFERENCES if r in names), None)


def relative_curves(data: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Each recipe's validation curve minus the fp32 AdamW one, at the steps both have (step 0 left
    out: every recipe starts from the same weights). Empty without an fp32 AdamW run."""
    runs = data["recipes"]
    ref = _reference(list(runs))
    if ref is None:
        return {}
    base = {p["step"]: p["val_loss"] for p in runs[ref]["curve"] if p["val_loss"] is not None}
    return {
        name: [
            (p["step"], p["val_loss"] - base[p["step"]])
            for p in run["curve"]
            if p["step"] > 0 and p["val_loss"] is not None and p["step"] in base
        ]
        for name, run in runs.items()
    }


def plot(data: dict[str, Any], path: str | Path | None = None) -> Any:
    """Write the race's picture to a PNG from its JSON dictionary (``race.to_json``, or a ``race.json``).

    Top: validation loss against steps, and the same curves minus the fp32 AdamW curve (the
    recipes differ by a few hundredths of a nat, invisible on the absolute scale). Bottom, one bar
    per recipe: final validation loss, step time, optimizer-state bytes per parameter and peak
    memory growth (what the low-precision recipes save).

    Returns the matplotlib ``Figure`` (saved to ``path`` when given). Raises ImportError naming the
    ``adamkit[plot]`` extra if matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError as err:
        raise ImportError(PLOT_MISSING) from err
    runs = data["recipes"]
    names = list(runs)
    ref = _reference(names)
    relative = relative_curves(data)
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    top, bottom = fig.add_gridspec(2, 1, height_ratios=[1.25, 1])
    curves, diff = (fig.add_subplot(g) for g in top.subgridspec(1, 2))
    bars = [fig.add_subplot(g) for g in bottom.subgridspec(1, 4, width_ratios=[1.25, 1, 1, 1])]
    # one colour per optimizer; its precision / state / gradient recipes keep it, each with a line
    # style (and bar hatch) of its own: solid for the first recipe of an optimizer
    from matplotlib import colormaps

    optimizer_of = {n: runs[n].get("optimizer_name", n) for n in names}
    optimizers = list(dict.fromkeys(optimizer_of.values()))
    cmap = colormaps["tab20" if len(optimizers) <= 20 else "turbo"]
    # tab20 pairs a dark and a light shade: the ten dark ones first, then the light ones
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    spread = len(optimizers) > 20
    hue = {o: cmap(i / (len(optimizers) - 1) if spread else order[i]) for i, o in enumerate(optimizers)}
    colors = {n: hue[optimizer_of[n]] for n in names}
    # AdamW has eight recipes: eight line styles and hatches
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2))]
    hatches = ["", "//", "..", "xx", "\\\\", "oo", "++", "--"]
    rank = {n: [m for m in names if optimizer_of[m] == optimizer_of[n]].index(n) for n in names}
    for name in names:
        pts = [p for p in runs[name]["curve"] if p["val_loss"] is not None]
        kw = dict(color=colors[name], ls=styles[rank[name] % len(styles)], marker="o", ms=3, lw=1.6)
        lr = runs[name].get("lr")  # absent from a race.json written before it was recorded
        label = name if lr is None else f"{name} (lr {lr:g})"
        curves.plot([p["step"] for p in pts], [p["val_loss"] for p in pts], label=label, **kw)
        if name in relative:
            diff.plot([st for st, _ in relative[name]], [d for _, d in relative[name]], **kw)
    curves.set(xlabel="step", ylabel="validation loss (nats)", title="validation loss")
    curves.legend(fontsize=8, ncols=2)
    if ref is not None:
        diff.axhline(0, color="black", lw=0.8)
        diff.set(
            xlabel="step",
            ylabel=f"minus {ref}'s val loss (nats)",
            title=f"relative to fp32 AdamW ({ref}): below 0 is better",
        )
        # Early steps differ by tenths, the end by hundredths: a symmetric log scale shows both.
        diff.set_yscale("symlog", linthresh=0.05, linscale=1.5)
        ticks = [-0.5, -0.2, -0.1, -0.05, -0.025, 0, 0.025, 0.05, 0.1, 0.2, 0.5]
        diff.set_yticks(ticks, [f"{t:+g}" if t else "0" for t in ticks])
        diff.text(
            0.99, 0.01, "linear within ±0.05, log beyond", transform=diff.transAxes, ha="right", fontsize=8
        )
    for ax in (curves, diff):
        ax.grid(alpha=0.3)

    y = list(range(len(names)))[::-1]  # first recipe on top, as in the table
    rss = [runs[n]["peak_rss_bytes"] for n in names]
    panels = [  # lower is better in every panel
        ("final validation loss (nats)", [runs[n]["val_loss"] for n in names], "{:.3f}"),
        ("ms per training step (median)", [runs[n]["ms_per_step"] for n in names], "{:.0f}"),
        ("optimizer state, bytes/param", [runs[n]["state_bytes_per_param"] for n in names], "{:.2f}"),
        ("peak RSS growth (MiB)", [None if b is None else b / 2**20 for b in rss], "{:.0f}"),
    ]
    for ax, (title, values, fmt) in zip(bars, panels):
        shown = [v if v is not None else 0.0 for v in values]
        hatch = [hatches[rank[n] % len(hatches)] for n in names]
        ax.barh(y, shown, color=[colors[n] for n in names], hatch=hatch)
        for yi, v in zip(y, values):
            ax.text(0, yi, " " + ("n/a" if v is None else fmt.format(v)), va="center", fontsize=8)
        if title.startswith("final"):  # differences are small: start the axis near the lowest loss
            finite = [v for v in values if v is not None]
            if finite:
                lo, hi = min(finite), max(finite)
                ax.set_xlim(lo - 0.6 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
                for t in ax.texts:  # labels at the axis's start, not at 0
                    t.set_x(ax.get_xlim()[0])
        ax.set_title(title, fontsize=10)
        ax.set_yticks(y, names if ax is bars[0] else [], fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    sweep = data.get("lr_sweep")
    how = (
        f"peak lr (legend): each optimizer's best of {len(sweep['grid'])} multiples of its paper's lr "
        f"on {sweep['steps']} steps of the quick race"
        if sweep
        else "peak lr (legend): the registry's"
    )
    fig.suptitle(
        f"adamkit race: {data['description']}\n{data['steps']} steps, seed {data['seed']}, "
        f"{data['threads']} threads; same weights and batches for every recipe\n{how}"
    )
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
