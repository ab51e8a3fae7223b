"""The harness's outputs: a JSON result file and a self-contained HTML report (plots embedded as base64 PNG).

`render_html(results)` builds the page from the JSON-ready results dict alone, so a report can be re-rendered
from `results.json`. The passage section colours each token by its first-choice expert, one line per MoE layer,
as in the Mixtral paper's Figure 8. Files are written atomically (temp file in the same folder, then
`os.replace`).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import colors as mcolors

from modeling_moe.hub import atomic_write_text

DROPPED_COLOUR = "#d0d0d0"


# ------------------------------------------------------------------------------------------------- files
def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(results: dict, path: str | os.PathLike) -> Path:
    """Write the results dict as indented JSON (NaN written as null), atomically."""
    return atomic_write_text(path, json.dumps(_nan_to_none(results), indent=2, default=_json_default) + "\n")


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------- plots
def figure_png(draw: Callable[[plt.Figure], None], size: tuple[float, float] = (6.4, 3.4)) -> str:
    """Draw on a new Agg figure and return it as a base64 PNG string."""
    fig = plt.figure(figsize=size, dpi=90)
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def expert_colour(expert: int, num_experts: int) -> str:
    """A distinct background colour per expert (tab10 / tab20, else hues); grey for a dropped token (-1)."""
    if expert < 0:
        return DROPPED_COLOUR
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20" if num_experts <= 20 else "hsv")
    rgba = cmap(expert % cmap.N if num_experts <= 20 else expert / num_experts)
    return mcolors.to_hex((*[0.55 * c + 0.45 for c in rgba[:3]], 1.0))  # lightened, so text stays readable


def _labels(layers: list[int]) -> list[str]:
    return [f"L{layer}" for layer in layers]


def plot_load_heatmap(routing: dict, key: str = "load") -> str:
    """Heatmap of the load fraction per MoE layer (rows) and expert (columns); with key="expert_mass", of the mean
    router probability instead (for Soft MoE: the mean combine weight, its load being equal by construction)."""
    loads = [s[key] for s in routing["layers"]]
    what = "load (fraction of assignments)" if key == "load" else "mass (mean combine weight)"
    layers = [s["layer"] for s in routing["layers"]]

    def draw(fig):
        ax = fig.add_subplot()
        im = ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(layers)), _labels(layers))
        ax.set_xticks(range(len(loads[0])))
        ax.set_title(f"expert {what}; balanced = {1 / len(loads[0]):.3f}")
        if len(loads[0]) * len(loads) <= 128:
            for i, row in enumerate(loads):
                for j, v in enumerate(row):
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < max(map(max, loads)) / 2 else "k"
                    )
        fig.colorbar(im, ax=ax)

    return figure_png(draw, (6.4, 1.6 + 0.45 * len(layers)))


def plot_balance(routing: dict) -> str:
    """Per MoE layer: CV of the load, load entropy against log E, dropped fraction."""
    layers = [s["layer"] for s in routing["layers"]]
    x = range(len(layers))

    def draw(fig):
        axes = fig.subplots(1, 3)
        axes[0].bar(x, [s["load_cv"] for s in routing["layers"]], color="#4c72b0")
        axes[0].set_title("load CV (0 = balanced)")
        axes[1].bar(x, [s["load_entropy"] for s in routing["layers"]], color="#55a868")
        axes[1].axhline(math.log(routing["num_experts"]), color="k", ls="--", lw=1, label="log E")
        axes[1].legend(fontsize=7)
        axes[1].set_title("load entropy (nats)")
        drops = [s["dropped_fraction"] for s in routing["layers"]]
        axes[2].bar(x, drops, color="#c44e52")
        axes[2].set_ylim(0, max(0.05, 1.1 * max(drops)))
        axes[2].set_title("dropped fraction")
        for ax in axes:
            ax.set_xticks(list(x), _labels(layers))

    return figure_png(draw, (8.0, 2.8))


def plot_confidence(routing: dict) -> str:
    """Per MoE layer: mean top-1 router probability and margin (top-1 minus top-2); mean router entropy."""
    layers = [s["layer"] for s in routing["layers"]]
    x = list(range(len(layers)))

    def draw(fig):
        left, right = fig.subplots(1, 2)
        width = 0.38
        left.bar([i - width / 2 for i in x], [s["top1_prob"] for s in routing["layers"]], width, label="top-1 prob")
        left.bar([i + width / 2 for i in x], [s["margin"] for s in routing["layers"]], width, label="margin")
        left.axhline(1 / routing["num_experts"], color="k", ls=":", lw=1, label="1/E")
        left.set_ylim(0, 1)
        left.set_title("router confidence")
        left.legend(fontsize=7)
        right.bar(x, [s["router_entropy"] for s in routing["layers"]], color="#55a868")
        right.axhline(math.log(routing["num_experts"]), color="k", ls="--", lw=1, label="log E (uniform)")
        right.set_title("router entropy (nats)")
        right.legend(fontsize=7)
        for ax in (left, right):
            ax.set_xticks(x, _labels(layers))

    return figure_png(draw, (8.0, 2.8))


def plot_consecutive(routing: dict) -> str:
    """Top-k agreement between each MoE layer and the next."""
    values = routing["consecutive_layer_agreement"]
    layers = routing["moe_layers"]

    def draw(fig):
        ax = fig.add_subplot()
        ax.bar(range(len(values)), values, color="#8172b2")
        ax.set_xticks(range(len(values)), [f"L{a}→L{b}" for a, b in itertools.pairwise(layers)])
        ax.set_ylim(0, 1)
        ax.set_title("consecutive-layer agreement (shared experts / k)")

    return figure_png(draw, (max(4.8, 1.6 + 1.2 * len(values)), 2.8))


def plot_capacity_sweep(sweep: dict, layers: list[int]) -> str:
    """Dropped fraction per MoE layer against the eval capacity factor, with the mean NLL."""

    def draw(fig):
        ax = fig.add_subplot()
        for i, layer in enumerate(layers):
            ax.plot(
                sweep["factors"], [row[i] for row in sweep["dropped_fraction"]], marker="o", label=f"L{layer} drops"
            )
        ax.set_xlabel("capacity factor (eval)")
        ax.set_ylabel("dropped fraction")
        ax2 = ax.twinx()
        ax2.plot(sweep["factors"], sweep["mean_nll"], color="k", ls="--", marker="x", label="mean NLL")
        ax2.set_ylabel("mean NLL (nats)")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [h.get_label() for h in lines], fontsize=7)
        ax.set_title("drops vs capacity factor")

    return figure_png(draw)


def plot_comparison(comparison: dict) -> str:
    """Per MoE layer: top-k agreement with the compared model and KL of the routing distributions."""
    layers = comparison["layers"]

    def draw(fig):
        a, b = fig.subplots(1, 2)
        a.bar(range(len(layers)), comparison["topk_agreement"], color="#4c72b0")
        a.set_ylim(0, 1)
        a.set_title("top-k agreement")
        b.bar(range(len(layers)), comparison["routing_kl"], color="#dd8452")
        b.set_title("KL(model || compared) (nats)")
        for ax in (a, b):
            ax.set_xticks(range(len(layers)), _labels(layers))

    return figure_png(draw, (7.2, 2.8))


def plot_loss_delta(histogram: dict) -> str:
    """Histogram of per-token loss differences (model minus compared model)."""

    def draw(fig):
        ax = fig.add_subplot()
        edges = histogram["edges"]
        ax.stairs(histogram["counts"], edges, fill=True, color="#64b5cd")
        ax.axvline(0, color="k", lw=1)
        ax.set_xlabel("loss(model) - loss(compared) per token (nats)")
        ax.set_title("token-by-token comparison")

    return figure_png(draw, (6.4, 2.8))


def plot_parameters(parameters: dict) -> str:
    """Total and active parameters per component (horizontal bars)."""
    names = [n for n in parameters["total"] if parameters["total"][n]]

    def draw(fig):
        ax = fig.add_subplot()
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], [parameters["total"][n] for n in names], 0.4, label="total")
        ax.barh([i - 0.2 for i in y], [parameters["active"][n] for n in names], 0.4, label="active per token")
        ax.set_yticks(list(y), names)
        ax.set_xlabel("parameters")
        ax.legend(fontsize=7)
        ax.set_title("parameters per component")

    return figure_png(draw, (6.4, 1.2 + 0.35 * len(names)))


def plot_throughput(throughput: dict) -> str:
    """Tokens per second of ours and the Mixtral reference, forward and generation."""

    def draw(fig):
        axes = fig.subplots(1, 2)
        for ax, key in zip(axes, ("forward", "generate")):
            values = [throughput[key]["ours_tokens_per_s"], throughput[key]["mixtral_tokens_per_s"]]
            ax.bar(["ours", "Mixtral"], values, color=["#4c72b0", "#999999"])
            ax.set_title(f"{key}: tokens/s (x{throughput[key]['speed_ratio']:.2f})")

    return figure_png(draw, (7.2, 2.6))


# ------------------------------------------------------------------------------------------------- html
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:2px;margin-top:28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:6px 0}
.passage{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;
border:1px solid #ddd;padding:6px}.passage span{border-radius:2px}.note{color:#666;font-size:13px}
.legend span{padding:1px 6px;margin-right:4px;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid table{font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}.plots img{max-width:49%;height:auto;margin:0}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _fmt(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_e(_fmt(v))}</td>' for i, v in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def passage_html(passage: dict, num_experts: int, layers: list[int]) -> str:
    """One block per MoE layer: the passage with every token's background the colour of its first-choice expert."""
    legend = "".join(
        f'<span style="background:{expert_colour(e, num_experts)}">expert {e}</span>' for e in range(num_experts)
    )
    legend += f'<span style="background:{DROPPED_COLOUR}">dropped</span>'
    blocks = [f'<div class="legend">{legend}</div>']
    for layer, choices in zip(layers, passage["first_choice"]):
        spans = "".join(
            f'<span title="expert {c}" style="background:{expert_colour(c, num_experts)}">{_e(t)}</span>'
            for t, c in zip(passage["tokens"], choices)
        )
        blocks.append(f'<p><b>layer {layer}</b></p><div class="passage">{spans}</div>')
    return "\n".join(blocks)


def top_tokens_html(top_tokens: list, layers: list[int]) -> str:
    """Per MoE layer, a table with one column per expert listing its most frequent tokens (count, share)."""
    out = []
    for layer, experts in zip(layers, top_tokens):
        depth = max((len(t) for t in experts), default=0)
        rows = []
        for r in range(depth):
            cells = []
            for tokens in experts:
                t = tokens[r] if r < len(tokens) else None
                cells.append(f"{t['token']}  {t['count']} ({t['share']:.0%})" if t else "")
            rows.append([r + 1, *cells])
        out.append(
            f"<p><b>layer {layer}</b></p>" + _table(["#", *[f"expert {e}" for e in range(len(experts))]], rows, 99)
        )
    return "\n".join(out)


def _quality_section(results: dict) -> str:
    quality = results.get("quality")
    if not quality:
        return ""
    keys = [
        "perplexity",
        "bits_per_byte",
        "mean_nll",
        "num_tokens",
        "num_bytes",
        "num_documents",
        "max_length",
        "stride",
    ]
    rows = [[name, *[q.get(k) for k in keys]] for name, q in quality["models"].items()]
    parts = ["<h2>Quality</h2>", _table(["model", *keys], rows)]
    comparison = quality.get("token_comparison")
    if comparison:
        parts.append(
            f"<p>Token by token: mean loss difference {_fmt(comparison['mean_delta'])} nats; the model is better on "
            f"{comparison['a_better_fraction']:.1%} of tokens.</p>"
        )
        parts.append(_img(plot_loss_delta(comparison["histogram"]), "per-token loss difference"))
    return "\n".join(parts)


def _routing_section(results: dict) -> str:
    routing = results.get("routing")
    if not routing:
        return ""
    layers = routing["moe_layers"]
    keys = ["load_cv", "load_entropy", "router_entropy", "top1_prob", "margin", "dropped_fraction", "dead_experts"]
    rows = [[f"L{s['layer']}", *[s[k] for k in keys]] for s in routing["layers"]]
    plots = [_img(plot_balance(routing), "load balance per layer"), _img(plot_confidence(routing), "router confidence")]
    heatmap = plot_load_heatmap(routing, "expert_mass" if routing["router_type"] == "soft" else "load")
    if len(layers) > 1:
        plots.append(_img(plot_consecutive(routing), "consecutive-layer agreement"))
    if routing.get("capacity_sweep"):
        plots.append(_img(plot_capacity_sweep(routing["capacity_sweep"], layers), "drops against capacity factor"))
    parts = [
        "<h2>Routing</h2>",
        f'<p class="note">{routing["router_type"]} routing, E={routing["num_experts"]}, k={routing["top_k"]}, '
        f"{routing['num_tokens']:,} tokens.</p>",
        f'<div class="plots">{_img(heatmap, "expert load heatmap")}{_table(["layer", *keys], rows)}</div>',
        f'<div class="plots">{"".join(plots)}</div>',
    ]
    if routing.get("comparison"):
        comp = routing["comparison"]
        parts.append("<h3>Routing compared with the second model</h3>")
        table = _table(
            ["layer", "top-k agreement", "KL (nats)"],
            [[f"L{a}", b, c] for a, b, c in zip(comp["layers"], comp["topk_agreement"], comp["routing_kl"])],
        )
        parts.append(f'<div class="plots">{_img(plot_comparison(comp), "routing comparison")}{table}</div>')
    parts.append("<h2>What experts learn</h2>")
    parts.append("<p>A passage, each token coloured by its first-choice expert:</p>")
    parts.append(passage_html(routing["passage"], routing["num_experts"], layers))
    parts.append("<p>Tokens most often routed to each expert (count, share of that token's occurrences):</p>")
    parts.append(f'<div class="grid">{top_tokens_html(routing["top_tokens"], layers)}</div>')
    return "\n".join(parts)


def _quantization_note(params: dict) -> str:
    spec = params.get("expert_quantization")
    if not spec:
        return ""
    scheme = "int8 per channel" if spec["bits"] == 8 else f"int4, groups of {spec['group_size']}"
    return f" (experts {scheme})"


def _cost_section(results: dict) -> str:
    cost = results.get("cost")
    if not cost:
        return ""
    params = cost["parameters"]
    rows = [[c, params["total"][c], params["active"][c]] for c in params["total"]]
    rows.append(["all", params["total_params"], params["active_params"]])
    memory = params["weight_memory_bytes"]
    parts = [
        "<h2>Cost</h2>",
        _table(["component", "total", "active"], rows),
        f"<p>Weights: {memory['bf16'] / 2**20:,.1f} MiB in bf16, {memory['fp32'] / 2**20:,.1f} MiB in fp32; "
        f"as loaded{_quantization_note(params)}: {params['loaded_weight_bytes']['total'] / 2**20:,.1f} MiB.</p>",
        _img(plot_parameters(params), "parameters per component"),
    ]
    tp = cost.get("throughput")
    if tp:
        rows = [
            [key, tp[key]["ours_tokens_per_s"], tp[key]["mixtral_tokens_per_s"], tp[key]["speed_ratio"]]
            for key in ("forward", "generate")
        ]
        parts.append(
            f'<p class="note">Measured on {_e(tp["device"])} ({tp["threads"]} threads, {_e(tp["dtype"])}), batch '
            f"{tp['batch_size']} x {tp['seq_len']} tokens, {tp['new_tokens']} generated tokens, "
            f"{tp['forward']['rounds']} rounds. Reference: {_e(tp['reference'])}.</p>"
        )
        parts.append(_table(["pass", "ours tok/s", "Mixtral tok/s", "speed ratio (Mixtral time / ours)"], rows))
        parts.append(_img(plot_throughput(tp), "throughput"))
    return "\n".join(parts)


def _lm_eval_section(results: dict) -> str:
    lm = results.get("lm_eval")
    if not lm:
        return ""
    rows = [[task, metric, value] for task, metrics in lm["results"].items() for metric, value in metrics.items()]
    note = f'<p class="note">lm-evaluation-harness {_e(lm.get("version", ""))}, '
    note += f"model class {_e(lm.get('model_class', ''))}"
    note += f", limit {_e(lm.get('limit'))}.</p>"
    return "<h2>Benchmarks (lm-evaluation-harness)</h2>" + note + _table(["task", "metric", "value"], rows, 2)


def render_html(results: dict) -> str:
    """The self-contained HTML report (inline CSS, plots as base64 PNG) for a results dict."""
    meta = results.get("meta", {})
    title = f"MoE evaluation: {meta.get('model', '')}"
    header = [f"<h1>{_e(title)}</h1>"]
    info = [[k, v] for k, v in meta.items() if k not in ("args", "versions") and v is not None]
    header.append(_table(["field", "value"], info, 2))
    notes = results.get("notes") or []
    if notes:
        header.append("<ul>" + "".join(f'<li class="note">{_e(n)}</li>' for n in notes) + "</ul>")
    body = "\n".join(
        [
            *header,
            _quality_section(results),
            _routing_section(results),
            _cost_section(results),
            _lm_eval_section(results),
        ]
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_html(results: dict, path: str | os.PathLike) -> Path:
    """Render and write the HTML report atomically. Returns the path."""
    return atomic_write_text(path, render_html(results))


__all__ = [
    "atomic_write_text",
    "expert_colour",
    "figure_png",
    "passage_html",
    "render_html",
    "top_tokens_html",
    "write_html",
    "write_json",
]
