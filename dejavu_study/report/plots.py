"""The report's PNGs, drawn from the summary only; several runs overlay in one figure.

matplotlib is imported inside make_plots: the rest of the report (and --no-plots) runs without it.
"""

from __future__ import annotations

import logging
import os

from dejavu_common.helpers import atomic_write
from dejavu_study.report.runs import KIND_TITLES, KINDS, MODES

log = logging.getLogger(__name__)


def run_label(run: dict) -> str:
    return run["name"] + ("" if run["evidence"] else " [random weights]")


def save_figure(fig, path: str) -> None:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")


def same_depth(summary: dict) -> bool:
    return len({len(run["dump"]["layers"]) for run in summary["runs"]}) <= 1


def depth_of(summary: dict, run: dict, layer: int) -> float:
    """The x of a layer: its index, or layer / last layer when the runs' models differ in depth
    (OPT-125m's 12 layers against Llama-3.2-3B's 28 line up by relative depth)."""
    if same_depth(summary):
        return layer
    return layer / max(1, len(run["dump"]["layers"]) - 1)


def depth_label(summary: dict, base: str = "layer") -> str:
    return base if same_depth(summary) else f"relative depth ({base} / last layer)"


def layer_series(summary: dict, run: dict, getter) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for layer in run["layers"]:
        value = getter(layer)
        if value is not None:
            xs.append(depth_of(summary, run, layer["layer"]))
            ys.append(value)
    return xs, ys


def get_pred(kind, mode, field):
    return lambda layer: (layer[kind][mode] or {}).get(field)


def finish_axes(ax, title, xlabel, ylabel, has_data):
    if xlabel.startswith("layer"):
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if has_data:  # below the axes: legends of overlaid runs would hide the curves
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_recall(plt, summary, colors):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    any_data = False
    for ax, kind in zip(axes, KINDS):
        has = False
        for run in summary["runs"]:
            for mode, style in zip(MODES, ("-", "--")):
                xs, ys = layer_series(summary, run, get_pred(kind, mode, "recall"))
                if xs:
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colors[run["name"]],
                            label=f"{run_label(run)} · input {mode}")
                    has = True
        if has:
            ax.axhline(summary["recall_floor"], color="gray", lw=0.8, ls=":")
        finish_axes(ax, f"{KIND_TITLES[kind]}: validation recall", depth_label(summary), "recall (sigmoid ≥ 0.5)", has)
        any_data |= has
    return fig, any_data


def plot_sparsity(plt, summary, colors):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    any_data = False
    for ax, kind in zip(axes, KINDS):
        has = False
        for run in summary["runs"]:
            color = colors[run["name"]]
            mode_with_truth = next((m for m in MODES if layer_series(summary, run, get_pred(kind, m, "true_sparsity"))[0]), None)
            if mode_with_truth:
                xs, ys = layer_series(summary, run, get_pred(kind, mode_with_truth, "true_sparsity"))
                ax.plot(xs, ys, "-", color=color, lw=2, label=f"{run_label(run)} · true")
                has = True
            for mode, marker in zip(MODES, ("o", "s")):
                xs, ys = layer_series(summary, run, get_pred(kind, mode, "classifier_sparsity"))
                if xs:
                    ax.plot(xs, ys, "--", marker=marker, ms=3, color=color,
                            label=f"{run_label(run)} · classifier, input {mode}")
                    has = True
        finish_axes(ax, f"{KIND_TITLES[kind]}: sparsity", depth_label(summary), "fraction inactive", has)
        any_data |= has
    return fig, any_data


def plot_drift(plt, summary, colors):
    panels = (("cos_next_layer", "cos(att_x_l, att_x_l+1)"), ("cos_mlp_x", "cos(att_x_l, mlp_x_l)"),
              ("rel_change_next_layer", "|att_x_l+1 − att_x_l| / |att_x_l|"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    any_data = False
    for ax, (field, title) in zip(axes, panels):
        has = False
        for run in summary["runs"]:
            stats = [(l["layer"], l["drift"][field]) for l in run["layers"] if l["drift"] and l["drift"].get(field)]
            if not stats:
                continue
            xs = [depth_of(summary, run, x) for x, _ in stats]
            color = colors[run["name"]]
            ax.plot(xs, [s["mean"] for _, s in stats], "-", marker="o", ms=3, color=color,
                    label=f"{run_label(run)} (mean, p10–p90)")
            ax.fill_between(xs, [s["p10"] for _, s in stats], [s["p90"] for _, s in stats], color=color, alpha=0.15)
            has = True
        finish_axes(ax, title, depth_label(summary, "layer l"), "per-token value", has)
        any_data |= has
    return fig, any_data


def plot_recall_vs_drift(plt, summary, colors):
    """Each layer's MLP recall at matched K against the similarity of consecutive layers' inputs
    (left) and against depth (right), from the findings' depth correlation."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    any_data = False
    for run in summary["runs"]:
        depth = run["findings"].get("depth")
        if not depth:
            continue
        color = colors[run["name"]]
        drift = depth["drift_means"].get("cos_next_layer") or []
        points = [(d, r, l) for d, r, l in zip(drift, depth["recall_at_matched_k"], depth["layers"]) if d is not None]
        rho = depth["spearman_recall_vs_drift"].get("cos_next_layer")
        if points:
            left.scatter([p[0] for p in points], [p[1] for p in points], color=color, s=14,
                         label=f"{run_label(run)} (Spearman {'—' if rho is None else f'{rho:.2f}'})")
            for d, r, l in points:
                left.annotate(str(l), (d, r), fontsize=6, color=color)
        xs = [depth_of(summary, run, l) for l in depth["layers"]]
        right.plot(xs, depth["recall_at_matched_k"], "-", marker="o", ms=3, color=color,
                   label=f"{run_label(run)} · recall at matched K")
        if any(v is not None for v in drift):
            right.plot(xs, [float("nan") if v is None else v for v in drift], "--", color=color, alpha=0.6,
                       label=f"{run_label(run)} · cos(att_x_l, att_x_l+1)")
        any_data = True
    finish_axes(left, "MLP recall at matched K against drift", "cos(att_x_l, att_x_l+1), mean over tokens",
                "recall at matched K", any_data)
    finish_axes(right, "recall and drift against depth", depth_label(summary), "value", any_data)
    return fig, any_data


def perplexity_series(run: dict) -> dict:
    """{(mode, axis, other keep): [(keep, ppl)]}; axis "mlp" when mlp_keep is set, else "att". One
    kept fraction for every layer: the allocated runs are on the frontier plots."""
    series = {}
    for e in run["perplexity"]["entries"]:
        if e["mode"] == "dense" or e["perplexity"] is None or e.get("allocation"):
            continue
        if e["mlp_keep"] is not None:
            key, x = (e["mode"], "mlp", e["att_keep"]), e["mlp_keep"]
        elif e["att_keep"] is not None:
            key, x = (e["mode"], "att", None), e["att_keep"]
        else:
            continue
        series.setdefault(key, []).append((x, e["perplexity"]))
    return {k: sorted(v) for k, v in series.items()}


def plot_perplexity(plt, summary, colors):
    all_series = {run["name"]: perplexity_series(run) for run in summary["runs"]}
    axes_used = sorted({axis for s in all_series.values() for (_, axis, _) in s}) or ["mlp"]
    fig, axes = plt.subplots(1, len(axes_used), figsize=(6.5 * len(axes_used), 4.4), squeeze=False)
    any_data, all_values = False, []
    for ax, axis in zip(axes[0], axes_used):
        has = False
        for run in summary["runs"]:
            color = colors[run["name"]]
            dense = (run["perplexity"].get("dense") or {}).get("perplexity")
            if dense is not None:
                ax.axhline(dense, color=color, ls=":", lw=1.2, label=f"{run_label(run)} · dense")
                all_values.append(dense)
                has = True
            for (mode, ax_name, other), points in all_series[run["name"]].items():
                if ax_name != axis:
                    continue
                style, marker = MODE_STYLES.get(mode, ("--", "s"))
                suffix = f", att keep {other:g}" if other is not None else ""
                ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=style, marker=marker, color=color,
                        label=f"{run_label(run)} · {mode}{suffix}")
                all_values += [p[1] for p in points]
                has = True
        if all_values and min(all_values) > 0 and max(all_values) / min(all_values) > 10:
            ax.set_yscale("log")
        finish_axes(ax, f"perplexity vs {'MLP' if axis == 'mlp' else 'attention'} kept fraction",
                    f"{'MLP neurons' if axis == 'mlp' else 'heads'} kept (fraction)", "perplexity", has)
        any_data |= has
    return fig, any_data


MODE_STYLES = {"oracle": ("-", "o"), "predicted": ("--", "s"), "teal": ("-.", "^"), "cats": (":", "D"),
               "wina": ((0, (5, 1, 1, 1)), "v")}


def plot_frontier(plt, summary, colors):
    """Perplexity change against the MLP bytes read per token (relative to dense), one line per
    method: the quality each method buys with the bytes it really reads (predictor, gate included)."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    has = False
    for run in summary["runs"]:
        frontier = ((run["findings"]["perplexity"] or {}).get("mlp_frontier") or {}).get("methods") or {}
        for mode, points in frontier.items():
            pts = sorted((p["bytes_relative"], p["increase_pct"]) for p in points
                         if p["bytes_relative"] is not None and p["increase_pct"] is not None)
            if not pts:
                continue
            style, marker = MODE_STYLES.get(mode, ("--", "s"))
            ax.plot([p[0] for p in pts], [max(p[1], 0.01) for p in pts], linestyle=style, marker=marker,
                    color=colors[run["name"]] if len(summary["runs"]) > 1 else None,
                    label=f"{run_label(run)} · {mode}" if len(summary["runs"]) > 1 else mode)
            has = True
    if has:
        ax.set_yscale("log")
    finish_axes(ax, "MLP sparsity: quality against bytes read", "MLP weight bytes read per token (fraction of dense)",
                "perplexity change vs dense (%, log)", has)
    return fig, has


def plot_frontier_time(plt, summary, colors):
    """Perplexity change against decode speed relative to dense, one line per method (uniform
    solid, allocated dashed); bounds and masks hollow."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    has = False
    palette = plt.get_cmap("tab10").colors
    for run in summary["runs"]:
        frontier = ((run["findings"]["perplexity"] or {}).get("mlp_frontier") or {}).get("methods") or {}
        for index, (method, points) in enumerate(sorted(frontier.items())):
            pts = sorted((p["speed_ratio"], p["increase_pct"], p.get("speed_kind")) for p in points
                         if p.get("speed_ratio") is not None and p["increase_pct"] is not None)
            if not pts:
                continue
            mode = method.split()[0]
            _, marker = MODE_STYLES.get(mode, ("--", "s"))
            hollow = pts[0][2] != "kernel"
            color = palette[list(MODE_STYLES).index(mode) % len(palette)] if mode in MODE_STYLES else None
            ax.plot([p[0] for p in pts], [max(p[1], 0.01) for p in pts], linestyle="--" if "allocated" in method
                    else "-", marker=marker, color=color, markerfacecolor="none" if hollow else color,
                    label=(f"{run_label(run)} · " if len(summary["runs"]) > 1 else "") + method
                    + (f" ({pts[0][2]})" if hollow else ""))
            has = True
    if has:
        ax.set_yscale("log")
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    finish_axes(ax, "MLP sparsity: quality against decode time", "decode speed vs dense (×, cpu backend)",
                "perplexity change vs dense (%, log)", has)
    return fig, has


def plot_recall_vs_k(plt, summary, colors):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    any_data = False
    for ax, kind in zip(axes, KINDS):
        has = False
        for run in summary["runs"]:
            for mode, marker in zip(MODES, ("o", "s")):
                pts = [(l[kind][mode]["kept_fraction"], l[kind][mode]["recall_at_matched_k"])
                       for l in run["layers"] if l[kind][mode]
                       and l[kind][mode]["kept_fraction"] is not None and l[kind][mode]["recall_at_matched_k"] is not None]
                if pts:
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=18,
                               color=colors[run["name"]], alpha=0.8,
                               label=f"{run_label(run)} · input {mode} (one point per layer)")
                    has = True
                found = run["findings"]["predictors"][kind][mode] or {}
                curve = [p for p in found.get("mean_recall_curve") or [] if p[2] is not None]
                if curve:  # recall of the top ceil(f * width) units, at the K/width actually kept
                    ax.plot([p[1] for p in curve], [p[2] for p in curve], "-" if mode == "same" else "--",
                            color=colors[run["name"]], label=f"{run_label(run)} · input {mode}, top-K at fixed "
                            "kept fraction (mean over layers)")
                    has = True
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":", label="chance (recall = K / width)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        finish_axes(ax, f"{KIND_TITLES[kind]}: recall vs K", "K / width (kept fraction)",
                    "recall of the top-K predicted", has)
        any_data |= has
    return fig, any_data


PLOTS = (("recall", "recall.png", plot_recall), ("sparsity", "sparsity.png", plot_sparsity),
         ("drift", "drift.png", plot_drift), ("recall_vs_drift", "recall_vs_drift.png", plot_recall_vs_drift),
         ("perplexity", "perplexity.png", plot_perplexity),
         ("recall_vs_k", "recall_vs_k.png", plot_recall_vs_k), ("frontier", "frontier.png", plot_frontier),
         ("frontier_time", "frontier_time.png", plot_frontier_time))


def make_plots(summary: dict, out_dir: str) -> dict:
    """Write the PNGs; returns {plot: file name} for the plots that had data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10").colors
    colors = {run["name"]: palette[i % len(palette)] for i, run in enumerate(summary["runs"])}
    made = {}
    for key, filename, plot in PLOTS:
        fig, has_data = plot(plt, summary, colors)
        try:
            if has_data:
                save_figure(fig, os.path.join(out_dir, filename))
                made[key] = filename
            else:
                log.info("no data for the %s plot; skipped", key)
        finally:
            plt.close(fig)
    return made
