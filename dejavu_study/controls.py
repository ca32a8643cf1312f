"""Controls report: why DejaVu's MLP predictors fall short on a SiLU-gated Llama.

    python -m dejavu_study.controls CONTROLS --dump RUN/dump [--out DIR] [--model NAME] [--layers SPEC]

CONTROLS is what scripts/controls.sh writes:
    predictors/{variant}/metrics_mlp.jsonl   one predictor set per variant: capacity (lowrank_D{D},
                                             linear, mlp_D{D}), label targets (label_{target}), and
                                             the ReLU models' sets (relu-{name}_topk)
    relu/{name}/checkpoint/relu_control.json the ReLU fits (dejavu_study/relu_control.py)
    controls.jsonl                           perplexity lines: model (silu | relu-{name}), mode
                                             (dense | oracle | predicted), keep, predictors, perplexity, tokens
    timings.jsonl                            seconds per step
and RUN/dump (the scaling study's dump, with drift.json from scripts/drift.py).

Each predictor set is scored three ways where its metrics line has them: recall at matched K on
the held-out tokens of the training dump (`val`), against the top-k of |SiLU(gate) * up| on those
tokens (`val_act_topk`, label targets), and on the rows of the validation passages' dump
(`eval_dump`: documents the predictors never saw). Output in DIR: summary.json (every number),
controls.md (rendered from it) and PNG plots. The report states what was measured; it draws no
conclusion the numbers do not show.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import re
import sys

from dejavu_common.helpers import atomic_write, write_json_atomic, write_text_atomic
from dejavu_study.report.depth import drift_vs_depth
from dejavu_study.report.markdown import fmt, fmt_pct
from dejavu_study.report.runs import ReportError, mean, read_json_file, read_jsonl

log = logging.getLogger("controls")

CAPACITY = re.compile(r"^(lowrank_D\d+|linear|mlp_D\d+)$")
LABEL = re.compile(r"^label_(act-topk|gate-positive|gate-topk)$")
RELU = re.compile(r"^(relu-[\w.-]+?)_(\w[\w.-]*)$")
RELU_RECORD = "relu_control.json"


# ---- drift against depth --------------------------------------------------------------------------
def plot_drift_vs_depth(result: dict, path: str, title: str = "") -> str | None:
    """Recall at matched K and the drift means against depth (left), recall against cos(att_x, mlp_x) (right)."""
    if not result["layers"]:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(result["layers"], result["recall_at_matched_k"], marker="o", color="black", label="recall at matched K")
    for q, values in result["drift_means"].items():
        if any(v is not None for v in values):
            left.plot(result["layers"], [math.nan if v is None else v for v in values], marker=".", linestyle="--",
                      label=f"{q} (mean)")
    left.set(xlabel="layer", title=title or "recall and drift against depth")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    # the similarity of consecutive layers' inputs where the dump has consecutive layers
    quantity = "cos_next_layer" if any(v is not None for v in result["drift_means"].get("cos_next_layer") or []) \
        else "cos_mlp_x"
    drift = result["drift_means"].get(quantity) or []
    points = [(d, r, l) for d, r, l in zip(drift, result["recall_at_matched_k"], result["layers"]) if d is not None]
    right.scatter([p[0] for p in points], [p[1] for p in points])
    for d, r, l in points:
        right.annotate(str(l), (d, r), fontsize=7)
    rho = result["spearman_recall_vs_drift"].get(quantity)
    right.set(xlabel={"cos_next_layer": "cos(att_x_l, att_x_l+1)", "cos_mlp_x": "cos(att_x_l, mlp_x_l)"}[quantity]
              + ", mean over tokens", ylabel="recall at matched K",
              title=f"Spearman rho = {fmt(rho)}")
    right.grid(alpha=0.3)
    return save(fig, plt, path)


# ---- reading ---------------------------------------------------------------------------------------
def latest_ok(path: str) -> dict[int, dict]:
    """Per layer the latest ok MLP metrics line of a metrics_mlp.jsonl."""
    if not os.path.isfile(path):
        return {}
    layers = {}
    for entry in read_jsonl(path)[0]:
        if entry.get("status") == "ok" and entry.get("kind") == "mlp":
            layers[int(entry["layer"])] = entry
    return layers


def metric(block, name="recall_at_matched_k"):
    return (block or {}).get(name)


def read_set(name: str, folder: str) -> dict | None:
    layers = latest_ok(os.path.join(folder, "metrics_mlp.jsonl"))
    if not layers:
        return None
    ordered = [layers[l] for l in sorted(layers)]
    first = ordered[0]
    per_layer = {}
    for e in ordered:
        ev = e.get("eval_dump") or {}
        per_layer[str(e["layer"])] = {
            "val": metric(e.get("val")), "val_act_topk": metric(e.get("val_act_topk")),
            "other_docs": metric(ev.get("metrics")), "other_docs_act_topk": metric(ev.get("act_topk")),
            "chance": None if e.get("val", {}).get("true_sparsity") is None else 1 - e["val"]["true_sparsity"],
            "recall": metric(e.get("val"), "recall"), "precision": metric(e.get("val"), "precision"),
            "best_epoch": e.get("best_epoch"), "epochs_run": e.get("epochs_run")}
    keys = ("val", "val_act_topk", "other_docs", "other_docs_act_topk", "chance")
    return {
        "name": name, "path": folder, "layers": sorted(layers),
        "form": first.get("predictor_form", "lowrank"), "D": first.get("D"),
        "label_rule": first.get("label_rule"), "label_target": first.get("label_target"),
        "data_path": first.get("data_path"), "eval_data_path": (first.get("eval_dump") or {}).get("data_path"),
        "rows_train": first.get("rows_train"), "rows_val": first.get("rows_val"),
        "rows_other_docs": (first.get("eval_dump") or {}).get("rows"),
        "epoch_cap": max(e.get("epochs") or 0 for e in ordered), "lr": first.get("lr"),
        "select_metric": first.get("select_metric"),
        "best_epoch_max": max((e.get("best_epoch") or 0) for e in ordered),
        **{f"mean_{k}": mean(p[k] for p in per_layer.values()) for k in keys},
        "per_layer": per_layer,
    }


def read_sets(controls: str) -> dict[str, dict]:
    folder = os.path.join(controls, "predictors")
    if not os.path.isdir(folder):
        raise ReportError(f"no predictors folder: {folder}")
    sets = {}
    for name in sorted(os.listdir(folder)):
        entry = read_set(name, os.path.join(folder, name))
        if entry is not None:
            sets[name] = entry
    if not sets:
        raise ReportError(f"no trained predictors under {folder}")
    return sets


def capacity_order(name: str) -> tuple:
    form, _, width = name.partition("_D")
    return ({"lowrank": 0, "linear": 1, "mlp": 2}.get(form, 3), int(width or 0))


def read_relu(controls: str) -> dict[str, dict]:
    folder = os.path.join(controls, "relu")
    out = {}
    if not os.path.isdir(folder):
        return out
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "checkpoint", RELU_RECORD)
        if os.path.isfile(path):
            record = read_json_file(path, "ReLU control record")
            layers = record.get("per_layer", {})
            out[name] = {
                "settings": record.get("settings"), "overrides": record.get("overrides"),
                "per_layer": {l: {"shift": r.get("shift"), "rows_train": r.get("rows_train"),
                                  "rows_heldout": r.get("rows_heldout"), "relu_swap": r.get("relu_swap"),
                                  "fitted": r.get("fitted")} for l, r in layers.items()},
                "mean_fitted_rel_mse": mean((r.get("fitted") or {}).get("heldout_rel_mse") for r in layers.values()),
                "mean_swap_rel_mse": mean((r.get("relu_swap") or {}).get("heldout_rel_mse") for r in layers.values()),
                "mean_fitted_zero_fraction": mean((r.get("fitted") or {}).get("heldout_zero_fraction")
                                                  for r in layers.values())}
    return out


def read_perplexity(controls: str) -> dict:
    """{model: {"dense": ppl, "tokens": n, "oracle": {keep: ppl}, "predicted": {(predictors, keep): ppl}}}."""
    path = os.path.join(controls, "controls.jsonl")
    if not os.path.isfile(path):
        return {}
    out = {}
    for e in read_jsonl(path)[0]:
        model = out.setdefault(e.get("model", "silu"), {"dense": None, "tokens": None, "oracle": {}, "predicted": {}})
        if e.get("mode") == "dense":
            model["dense"], model["tokens"] = e.get("perplexity"), e.get("tokens")
        elif e.get("mode") == "oracle":
            model["oracle"][str(e["keep"])] = e.get("perplexity")
        elif e.get("mode") == "predicted":
            model["predicted"][f"{e.get('predictors')}@{e['keep']}"] = e.get("perplexity")
    return out


def change_pct(value, base):
    return None if value is None or not base else 100.0 * (value / base - 1.0)


# ---- summary ----------------------------------------------------------------------------------------
def study_depth(path: str | None) -> dict | None:
    """Recall against drift and depth over every layer of the study's dump: the first run's depth
    findings in a study report's summary.json (scripts/report.py)."""
    if not path:
        return None
    study = read_json_file(path, "study report summary")
    for run in study.get("runs") or []:
        depth = (run.get("findings") or {}).get("depth")
        if depth:
            return {"summary": os.path.abspath(path), "run": run.get("name"), "model": run.get("model"), **depth}
    log.warning("%s: no run with a depth finding (recall and drift per layer)", path)
    return None


def build_summary(controls: str, dump: str, model: str, layer_spec: str, drift_set: str,
                  study: str | None = None, reference_set: str | None = None, answer_keep: float = 0.5) -> dict:
    meta = read_json_file(os.path.join(dump, "meta.json"), "dump metadata file")
    sets = read_sets(controls)
    ppl = read_perplexity(controls)
    for name, model_ppl in ppl.items():
        for key, value in list(model_ppl["predicted"].items()):
            predictors, _, keep = key.rpartition("@")
            model_ppl["predicted"][key] = {
                "predictors": predictors, "keep": float(keep), "perplexity": value,
                "change_pct": change_pct(value, model_ppl["dense"]),
                "gap_to_oracle_pct": change_pct(value, model_ppl["oracle"].get(keep))}
        model_ppl["oracle_change_pct"] = {k: change_pct(v, model_ppl["dense"]) for k, v in model_ppl["oracle"].items()}
    drift_path = os.path.join(dump, "drift.json")
    drift = read_json_file(drift_path, "drift file") if os.path.isfile(drift_path) else None
    reference = sets.get(drift_set)
    drift_result = None
    if drift is not None and reference is not None:
        source = "other_docs" if reference["mean_other_docs"] is not None else "val"
        drift_result = {"predictors": drift_set, "drift_file": drift_path, "source": source,
                        **drift_vs_depth({int(l): v[source] for l, v in reference["per_layer"].items()}, drift)}
    timings = read_jsonl(os.path.join(controls, "timings.jsonl"))[0] if os.path.isfile(
        os.path.join(controls, "timings.jsonl")) else []
    summary = {
        "format": "dejavu-llama-controls", "version": 1,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "controls": os.path.abspath(controls), "dump": os.path.abspath(dump),
        "model": model or meta.get("model"), "layers": meta.get("layers"), "layer_spec": layer_spec,
        "num_layers": meta.get("num_layers"), "dump_tokens": meta.get("tokens"),
        "capacity": [sets[n] for n in sorted((n for n in sets if CAPACITY.match(n)), key=capacity_order)],
        "labels": [sets[n] for n in sets if LABEL.match(n)],
        "relu_predictors": [sets[n] for n in sets if RELU.match(n) and not LABEL.match(n)],
        "relu_fits": read_relu(controls), "perplexity": ppl, "drift_vs_depth": drift_result,
        "study_depth": study_depth(study),
        "timings": {t["step"]: t.get("seconds") for t in timings if "step" in t},
    }
    reference = reference_set or drift_set
    summary["answer"] = decisive_control(summary, reference, answer_keep)
    other_keeps = sorted({float(k) for k in ((ppl.get("silu") or {}).get("oracle_change_pct") or {})} - {answer_keep},
                         reverse=True)
    summary["answer_other_keeps"] = [decisive_control(summary, reference, keep) for keep in other_keeps]
    return summary


# ---- which control decides ------------------------------------------------------------------------
DECISIVE_SHARE = 0.5        # a control "decides" when it closes at least this share of the gap
DENSE_TOLERANCE_PCT = 10.0  # a ReLU stand-in counts when its dense perplexity is within this of the original


def fmt_points(value) -> str:
    return "–" if value is None else f"{value:+.1f}"


def gap_to_oracle(ppl: dict, model: str, predictors: str, keep: float) -> float | None:
    """Predicted minus oracle perplexity change over dense (percentage points) of one model at one keep."""
    p = ppl.get(model) or {}
    oracle = next((v for k, v in (p.get("oracle_change_pct") or {}).items() if float(k) == keep), None)
    entry = next((e for e in (p.get("predicted") or {}).values()
                  if e["predictors"] == predictors and e["keep"] == keep), None)
    if oracle is None or entry is None or entry["change_pct"] is None:
        return None
    return entry["change_pct"] - oracle


def decisive_control(summary: dict, reference: str, keep: float) -> dict:
    """Which control closes the most of the reference predictors' gap to oracle at `keep`.

    The gap is predicted minus oracle perplexity change (points) with the reference set on the
    SiLU model. Capacity and label: the best set of the group on the same model. Activation
    function: each ReLU stand-in's own predictors against its own oracle, counted only when its
    dense perplexity is within DENSE_TOLERANCE_PCT of the original. A control decides when it
    closes at least DECISIVE_SHARE of the gap; otherwise none does."""
    ppl = summary["perplexity"]
    base = gap_to_oracle(ppl, "silu", reference, keep)
    out = {"reference": reference, "keep": keep, "gap_points": base, "rule": (
        f"share of the gap (predicted − oracle perplexity change at keep {keep:g}, predictors {reference}) "
        f"a control closes; decisive at {DECISIVE_SHARE:g} or more"), "controls": {}}
    if base is None:
        out["sentence"] = f"Not measured: no predicted and oracle perplexity of {reference} at keep {keep:g}."
        return out
    if base <= 0:
        out["sentence"] = (f"No gap to explain: at keep {keep:g} the {reference} predictors cost no more perplexity "
                           f"than oracle ({fmt_points(base)} points).")
        return out
    candidates = {"capacity": [(s["name"], "silu") for s in summary["capacity"]],
                  "label": [(s["name"], "silu") for s in summary["labels"]]}
    silu_dense = (ppl.get("silu") or {}).get("dense")
    excluded = []
    for model in sorted(m for m in ppl if m.startswith("relu-")):
        dense_change = change_pct(ppl[model].get("dense"), silu_dense)
        sets = [e["predictors"] for e in ppl[model]["predicted"].values() if e["keep"] == keep]
        if dense_change is None or abs(dense_change) > DENSE_TOLERANCE_PCT:
            excluded.append(f"{model} (dense {fmt_pct(dense_change)} against the original)")
            continue
        candidates.setdefault("activation function", []).extend((name, model) for name in sorted(set(sets)))
    for control, options in candidates.items():
        gaps = [(gap_to_oracle(ppl, model, name, keep), name, model) for name, model in options]
        gaps = [g for g in gaps if g[0] is not None]
        if gaps:
            gap, name, model = min(gaps)
            out["controls"][control] = {"best": name, "model": model, "gap_points": gap,
                                        "share_closed": (base - gap) / base}
    out["excluded"] = excluded
    best = max(out["controls"].items(), key=lambda item: item[1]["share_closed"], default=None)
    what = {"capacity": "predictor capacity", "label": "the training label",
            "activation function": "the activation function (ReLU in place of SiLU, attention, RoPE and drift held)"}
    if best and best[1]["share_closed"] >= DECISIVE_SHARE:
        control, b = best
        out["decisive"] = control
        out["sentence"] = (f"The decisive control is {what[control]}: with {b['best']} on the {b['model']} model the "
                           f"predicted-minus-oracle perplexity gap at keep {keep:g} is {fmt_points(b['gap_points'])} "
                           f"points against {fmt_points(base)} for {reference} on the original, {b['share_closed']:.0%} "
                           "of it closed.")
    else:
        out["decisive"] = None
        closest = (f"; the most any closes is {best[1]['share_closed']:.0%} ({what[best[0]]}, {best[1]['best']})"
                   if best else "")
        out["sentence"] = (f"No control decides: none closes {DECISIVE_SHARE:.0%} of the {fmt_points(base)}-point "
                           f"predicted-minus-oracle perplexity gap at keep {keep:g} ({reference}){closest}.")
    if excluded:
        out["sentence"] += " Not counted (dense perplexity too far from the original): " + ", ".join(excluded) + "."
    return out


# ---- plots -------------------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, plt, path: str) -> str:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return os.path.basename(path)


def make_plots(summary: dict, out: str) -> dict:
    written = {}
    groups = [("capacity", summary["capacity"]), ("labels", summary["labels"]),
              ("relu", summary["relu_predictors"])]
    for group, sets in groups:
        if not sets:
            continue
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [s["name"] for s in sets]
        positions = list(range(len(sets)))
        act = "ReLU" if group == "relu" else "SiLU"  # the true top-k is of each set's own model
        for offset, (key, label) in enumerate((("mean_val", "held-out tokens, own label"),
                                               ("mean_val_act_topk", f"held-out tokens, top-k |{act}(gate)*up|"),
                                               ("mean_other_docs", "other documents, own label"),
                                               ("mean_other_docs_act_topk", f"other documents, top-k |{act}(gate)*up|"))):
            values = [s.get(key) for s in sets]
            if all(v is None for v in values):
                continue
            ax.bar([p + 0.2 * offset - 0.3 for p in positions], [v or 0 for v in values], width=0.2, label=label)
        chance = mean(s.get("mean_chance") for s in sets)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", label="chance (K / width)")
        ax.set_xticks(positions, names, rotation=30, ha="right")
        ax.set(ylabel=f"recall at matched K, mean over layers {summary['layer_spec']}", ylim=(0, 1),
               title=f"MLP predictors: {group}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        written[group] = save(fig, plt, os.path.join(out, f"{group}.png"))
    if summary["drift_vs_depth"]:
        path = plot_drift_vs_depth(summary["drift_vs_depth"], os.path.join(out, "drift_vs_depth.png"),
                                   f"predictors {summary['drift_vs_depth']['predictors']}")
        if path:
            written["drift_vs_depth"] = path
    if summary.get("study_depth"):
        d = summary["study_depth"]
        path = plot_drift_vs_depth(d, os.path.join(out, "study_drift_vs_depth.png"),
                                   f"every layer of {d['run']} (study report)")
        if path:
            written["study_drift_vs_depth"] = path
    return written


# ---- markdown ----------------------------------------------------------------------------------------
def set_row(s: dict) -> str:
    return (f"| {s['name']} | {s['form']} | {s['D'] if s['D'] is not None else 'full'} | "
            f"{fmt(s['mean_val'])} | {fmt(s['mean_val_act_topk'])} | {fmt(s['mean_other_docs'])} | "
            f"{fmt(s['mean_other_docs_act_topk'])} | {fmt(s['mean_chance'])} | {s['best_epoch_max']} / {s['epoch_cap']} |")


SET_HEADER = ["| set | form | D | held-out tokens | held-out, top-k act | other documents | other docs, top-k act "
              "| chance | best epoch (max) / cap |", "|---|---|---|---|---|---|---|---|---|"]


def perplexity_lines(summary: dict, model: str) -> list[str]:
    p = summary["perplexity"].get(model)
    if not p:
        return [f"- No perplexity was measured for {model}."]
    lines = [f"- {model}: dense perplexity {fmt(p['dense'], 2)} on {p['tokens'] or 0:,} validation tokens; oracle "
             + ", ".join(f"keep {k}: {fmt_pct(v)}" for k, v in sorted(p["oracle_change_pct"].items())) + "."]
    for entry in sorted(p["predicted"].values(), key=lambda e: (e["predictors"], -e["keep"])):
        lines.append(f"- {model}, predictors {entry['predictors']}, keep {entry['keep']:g}: "
                     f"{fmt_pct(entry['change_pct'])} over dense (gap to oracle {fmt_pct(entry['gap_to_oracle_pct'])}).")
    return lines


def answer_lines(summary: dict) -> list[str]:
    a = summary.get("answer")
    if not a:
        return []
    lines = ["## Answer", "", a["sentence"], "", f"Rule: {a['rule']}."]
    if a.get("controls"):
        lines += ["", "| control | best set (model) | gap to oracle, points | share of the gap closed |",
                  "|---|---|---|---|",
                  f"| none (reference) | {a['reference']} (silu) | {fmt_points(a['gap_points'])} | – |"]
        lines += [f"| {name} | {c['best']} ({c['model']}) | {fmt_points(c['gap_points'])} | {c['share_closed']:.0%} |"
                  for name, c in a["controls"].items()]
    for other in summary.get("answer_other_keeps") or []:
        shares = "; ".join(f"{name} {c['share_closed']:.0%} ({c['best']})" for name, c in other.get("controls", {}).items())
        lines += ["", f"At keep {other['keep']:g}: {other['sentence']}" + (f" Shares closed: {shares}." if shares else "")]
    lines += relu_zeros_caveat(summary, a["keep"])
    return lines


def relu_zeros_caveat(summary: dict, keep: float) -> list[str]:
    """Where a ReLU stand-in's exact zeros leave no more non-zero neurons than `keep` keeps, its
    oracle loses nothing and its predictors need only rank the non-zeros above the zeros."""
    notes = []
    for name, fit in sorted((summary.get("relu_fits") or {}).items()):
        zeros = fit.get("mean_fitted_zero_fraction")
        if zeros is not None and 1 - zeros <= keep:
            notes.append(f"relu-{name} leaves {1 - zeros:.0%} of its neurons non-zero (mean over layers)")
    if not notes:
        return []
    return ["", f"Read with care: {'; '.join(notes)}: no more than keep {keep:g} keeps, so such a model's oracle "
                "keeps every non-zero neuron and its predictors need only rank the non-zeros above the zeros. A "
                "smaller kept fraction (above, where measured) tests them where that is not so."]


def render_markdown(summary: dict, plots: dict) -> str:
    sets = summary["capacity"] + summary["labels"] + summary["relu_predictors"]
    first = sets[0]
    lines = [f"# Controls: why MLP predictors fall short on {summary['model']}", "",
             f"Generated {summary['generated']} from `{summary['controls']}`.", ""] + answer_lines(summary) + [
             "", "## What was measured", "",
             f"- Model {summary['model']}; layers {summary['layer_spec']} of {summary['num_layers']} (the others "
             "stay dense in every perplexity run); MLP predictors only, attention dense.",
             f"- Training dump of {summary['dump_tokens']:,} tokens; each set trains on {first['rows_train']:,} "
             f"training rows and is scored on {first['rows_val']:,} held-out rows of the same dump and on "
             f"{first['rows_other_docs'] or 0:,} rows of the validation passages' dump (other documents).",
             f"- Training: AdamW lr {first['lr']}, the epoch with the best {first['select_metric']} kept, under a "
             f"cap of {first['epoch_cap']} epochs.",
             "- Recall at matched K: per token the K highest predictor scores against the K true units; chance is "
             "K / width. 'top-k act' scores every set against the top-k of |act(gate) * up| of its own model (SiLU; ReLU "
             "for the ReLU models' sets), whatever it trained on.",
             "", "## Predictor capacity", ""]
    lines += SET_HEADER + [set_row(s) for s in summary["capacity"]] if summary["capacity"] else ["No capacity sets."]
    lines += ["", "## Label targets", ""]
    lines += SET_HEADER + [set_row(s) for s in summary["labels"]] if summary["labels"] else ["No label-target sets."]
    lines += ["", "## ReLU stand-in", ""]
    fits = summary["relu_fits"]
    if not fits:
        lines.append("No ReLU fit was found.")
    for name, fit in fits.items():
        s = fit["settings"] or {}
        lines.append(f"- {name}: overrides {fit['overrides']}; fitted on {s.get('rows')} rows for {s.get('epochs')} "
                     f"epochs (lr {s.get('lr')}, l1 {s.get('l1')}, target zeros {s.get('target_zeros')}); held-out "
                     f"relative MLP error {fmt(fit['mean_swap_rel_mse'])} with the original weights, "
                     f"{fmt(fit['mean_fitted_rel_mse'])} fitted; zero fraction {fmt(fit['mean_fitted_zero_fraction'])} "
                     "(means over layers).")
        for layer, r in sorted(fit["per_layer"].items(), key=lambda item: int(item[0])):
            lines.append(f"  - layer {layer}: shift {fmt(r['shift'], 4)}, error {fmt(r['relu_swap']['heldout_rel_mse'])}"
                         f" -> {fmt(r['fitted']['heldout_rel_mse'])}, zeros "
                         f"{fmt(r['relu_swap']['heldout_zero_fraction'])} -> {fmt(r['fitted']['heldout_zero_fraction'])}")
    if summary["relu_predictors"]:
        lines += ["", "Predictors trained on the ReLU models' own dumps:", ""] + SET_HEADER
        lines += [set_row(s) for s in summary["relu_predictors"]]
    lines += ["", "## Perplexity", ""]
    for model in sorted(summary["perplexity"]):
        lines += perplexity_lines(summary, model)
    lines += ["", "## Drift against depth", ""]
    d = summary["drift_vs_depth"]
    if not d:
        lines.append("No drift file or no reference predictor set: not computed.")
    else:
        source = "other documents" if d.get("source") == "other_docs" else "held-out tokens"
        lines.append(f"- Predictors {d['predictors']} ({source}), layers {d['layers']}: Spearman rho of recall "
                     f"at matched K against depth {fmt(d['spearman_recall_vs_depth'])}; against the drift means: "
                     + ", ".join(f"{q} {fmt(v)}" for q, v in d["spearman_recall_vs_drift"].items()) + ".")
        lines.append(f"- With {len(d['layers'])} layers a rank correlation is coarse: one swapped pair moves it by "
                     f"{fmt(6 * 2 / (len(d['layers']) * (len(d['layers']) ** 2 - 1)) if len(d['layers']) > 1 else None)}.")
    sd = summary.get("study_depth")
    if sd:
        lines += ["", f"Every layer of the study's dump ({sd['run']}, {len(sd['layers'])} layers, recall at matched K "
                  f"of its MLP predictors as its report gives it, from `{sd['summary']}`): Spearman rho of recall against "
                  f"depth {fmt(sd['spearman_recall_vs_depth'])}; against cos(att_x_l, att_x_l+1), the similarity of "
                  f"consecutive layers' inputs, {fmt(sd['spearman_recall_vs_drift'].get('cos_next_layer'))}; against "
                  f"cos(att_x_l, mlp_x_l) {fmt(sd['spearman_recall_vs_drift'].get('cos_mlp_x'))}."]
    lines += ["", "## Per layer (recall at matched K: held-out tokens / other documents)", "",
              "| set | " + " | ".join(f"layer {l}" for l in summary["layers"]) + " |",
              "|---|" + "---|" * len(summary["layers"])]
    for s in sets:
        cells = [f"{fmt(s['per_layer'].get(str(l), {}).get('val'))} / "
                 f"{fmt(s['per_layer'].get(str(l), {}).get('other_docs'))}" for l in summary["layers"]]
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    t = summary["timings"]
    if t:
        lines += ["", "## Cost of this run", "", "- " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items()
                                                                    if isinstance(v, (int, float))) + "."]
    lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("controls", help="the controls folder scripts/controls.sh writes")
    parser.add_argument("--dump", required=True, help="the training dump (its meta.json and drift.json)")
    parser.add_argument("--out", default=None, help="output folder (default: CONTROLS/report)")
    parser.add_argument("--model", default="", help="model name for the report (default: meta.json's)")
    parser.add_argument("--layers", default="", help="the layer spec the run used, for the text")
    parser.add_argument("--drift-set", default="lowrank_D128",
                        help="the predictor set whose per-layer recall is set against drift")
    parser.add_argument("--reference-set", default=None,
                        help="the predictor set whose gap to oracle the controls are measured against "
                             "(default: --drift-set)")
    parser.add_argument("--keep", type=float, default=0.5, help="the MLP kept fraction the answer compares at")
    parser.add_argument("--study", default=None,
                        help="a study report's summary.json (scripts/report.py): its recall against drift and "
                             "depth over every layer of its dump goes into this report")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[controls] %(levelname)s: %(message)s", stream=sys.stderr)
    out = args.out or os.path.join(args.controls, "report")
    try:
        summary = build_summary(args.controls, args.dump, args.model, args.layers, args.drift_set, args.study,
                                args.reference_set, args.keep)
        os.makedirs(out, exist_ok=True)
        plots = {} if args.no_plots else make_plots(summary, out)
        write_json_atomic(os.path.join(out, "summary.json"), summary)
        write_text_atomic(os.path.join(out, "controls.md"), render_markdown(summary, plots))
    except ReportError as error:
        log.error("%s", error)
        return 1
    log.info("wrote %s", os.path.join(out, "controls.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
