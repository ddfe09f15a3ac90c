"""`dsinfer bench --plot`: the figures as a PNG of small bar charts, one per figure (each with its own unit and
scale), dsinfer beside transformers when both ran. Needs matplotlib (pip install 'dsinfer[plot]')."""
import importlib.util
import math
import textwrap
from pathlib import Path

COLORS = {"dsinfer": "#1f77b4", "transformers": "#ff7f0e"}


def require():
    """Called before the model loads, so that a missing matplotlib costs no benchmark run."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or pip install 'dsinfer[plot]')")


def unit(name: str) -> tuple[str, str]:
    """The figure's unit and which way is better, from its name."""
    if "tok/s" in name:
        return "tokens/s", "higher is better"
    if "requests/s" in name:
        return "requests/s", "higher is better"
    if " ms" in name:
        return "milliseconds", "lower is better"
    return "ratio", "lower is better"


def groups(results: dict) -> dict[tuple[str, str], list[tuple[str, dict[str, float]]]]:
    """(section, unit) -> [(figure, {engine: value})] in the report's order: one chart per group, so that the
    bars in a chart share a unit. With a peer, only the figures both engines have."""
    ours, peer = results["dsinfer"], results.get("transformers") or {}
    out = {}
    for section, figures in ours.items():
        for name, value in figures.items():
            other = peer.get(section, {}).get(name)
            if not peer or other is not None:
                values = {"dsinfer": value} | ({"transformers": other} if peer else {})
                out.setdefault((section, unit(name)[0]), []).append((name, values))
    return out


def number(v: float) -> str:
    return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"


def draw_group(ax, section: str, rows: list[tuple[str, dict[str, float]]]):
    """Horizontal bars, one row per figure, the engines side by side within it; values written at the ends."""
    label, better = unit(rows[0][0])
    engines = list(rows[0][1])
    height = 0.8 / len(engines)
    for k, engine in enumerate(engines):
        values = [v[engine] for _, v in rows]
        bars = ax.barh([i + k * height for i in range(len(rows))], values, height=height, color=COLORS[engine],
                       label=engine)
        ax.bar_label(bars, labels=[number(v) for v in values], fontsize=8, padding=3)
    centres = [i + height * (len(engines) - 1) / 2 for i in range(len(rows))]
    ax.set_yticks(centres, ["\n".join(textwrap.wrap(name, 28)) for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(section, fontsize=10)
    ax.set_xlabel(f"{label} ({better})", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.margins(x=0.22)
    ax.spines[["top", "right"]].set_visible(False)


def title(rec: dict) -> str:
    s, m = rec["settings"], rec["machine"]
    engines = "dsinfer vs transformers" if rec["results"].get("transformers") else "dsinfer"
    return (f"dsinfer bench: {engines} on {Path(str(s['model'])).name}, {s['dtype']}, {s['device']}, "
            f"{s['threads']} threads\n{m['cpu_model']} ({', '.join(m['isa'][-3:]) or 'no SIMD flags'}); "
            f"{s['num_requests']} requests, prompts {s['input_len'][0]}-{s['input_len'][1]} tokens, outputs "
            f"{s['output_len'][0]}-{s['output_len'][1]}, concurrency {s['concurrency']}; {rec['date'][:10]}")


def draw(path: str, rec: dict):
    from matplotlib.figure import Figure
    items = list(groups(rec["results"]).items())
    cols = min(2, len(items))
    rows = math.ceil(len(items) / cols)
    bars = [len(g) * len(g[0][1]) for _, g in items]  # each chart's height follows its number of bars
    heights = [max(bars[r * cols:(r + 1) * cols]) + 1.5 for r in range(rows)]
    fig = Figure(figsize=(6 * cols, 0.32 * sum(heights) + 1.2 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"height_ratios": heights}).flatten()
    for ax, ((section, _), group) in zip(axes, items):
        draw_group(ax, section, group)
    for ax in axes[len(items):]:
        ax.set_visible(False)
    if rec["results"].get("transformers"):
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper right", fontsize=9)
    fig.suptitle(title(rec), fontsize=10)
    fig.savefig(path, format="png", dpi=110)
