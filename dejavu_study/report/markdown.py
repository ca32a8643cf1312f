"""report.md, rendered from the summary only (as read back from summary.json), never from the run folders."""

from __future__ import annotations

from dejavu_study.downstream import render_table as render_downstream
from dejavu_study.report.findings import PERPLEXITY_TOLERANCE_PCT
from dejavu_study.report.plots import PLOTS
from dejavu_study.report.runs import DRIFT_FIELDS, KIND_TITLES, KINDS, MODES

RANDOM_WEIGHTS_MARK = "random weights — not evidence"
INPUT_DESCRIPTIONS = {
    ("mlp", "same"): "mlp_x_l", ("mlp", "prev"): "att_x_l (before attention)",
    ("att", "same"): "att_x_l", ("att", "prev"): "att_x_{l-1} (look-ahead)",
}


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_pct(value) -> str:
    if value is None:
        return "–"
    if value >= 900:  # a factor reads better than +2220019.3%
        factor = 1.0 + value / 100.0
        return f"×{factor:.1f}" if factor < 100 else f"×{factor:,.0f}"
    return f"{value:+.1f}%"


def md_headline(run: dict) -> list[str]:
    """The study's answer for one run: how far each component can be cut, oracle and predicted."""
    lines = [f"### {run_heading(run)}", ""]
    f = run["findings"]["perplexity"]
    best = (f or {}).get("lowest_keep_within_tolerance") or {}
    for axis, title, other in (("mlp", "MLP neurons", "attention"), ("att", "Attention heads", "MLP")):
        parts = []
        for mode in ("oracle", "predicted"):
            item = best.get(f"{axis}_{mode}")
            if item is None:
                continue
            tried = ", ".join(f"{k:g} → {fmt_pct(p)}" for k, p in zip(item["kept_fractions"], item["increase_pct"]))
            verdict = (f"down to keep {item['lowest_keep']:g}" if item["lowest_keep"] is not None
                       else "at none of the kept fractions run")
            parts.append(f"{mode} selection stays within {PERPLEXITY_TOLERANCE_PCT:g}% of dense perplexity "
                         f"{verdict} ({tried})")
        if parts:
            lines.append(f"- {title} cut alone ({other} dense): " + "; ".join(parts) + ".")
    for kind in KINDS:
        p = run["findings"]["predictors"][kind]["same"]
        if p is not None and p["mean_recall_at_matched_k"] is not None and p["mean_kept_fraction"] is not None:
            title = KIND_TITLES[kind][0].upper() + KIND_TITLES[kind][1:]
            lines.append(f"- {title}: the predictors' top-K holds "
                         f"{fmt(p['mean_recall_at_matched_k'])} of the truly active units against "
                         f"{fmt(p['mean_kept_fraction'])} by chance (mean over {plural(p['layers'], 'layer')}, "
                         "input same).")
    frontier = (f or {}).get("mlp_frontier")
    for budget in (frontier or {}).get("budgets", []):
        if budget["best"] is None:
            continue
        others = ", ".join(f"{mode} {fmt_pct(pct)}" for mode, pct in sorted(budget["methods"].items())
                           if mode != budget["best"])
        lines.append(f"- MLP at keep {budget['keep']:g}: the best method without the layer's own activations is "
                     f"{budget['best']} ({fmt_pct(budget['best_increase_pct'])} perplexity, "
                     f"{fmt(budget['best_bytes_relative'], 2)} of the dense MLP's bytes), "
                     + (f"{budget['best_over_oracle']:.2f}× oracle's perplexity" if budget.get('best_over_oracle')
                        is not None else "no oracle run beside it") + (f"; {others}" if others else "") + ".")
    if len(lines) == 2:
        lines.append("- No sparse perplexity runs with one component cut alone, and no predictor metrics.")
    if not run["evidence"]:
        lines.append(f"- {RANDOM_WEIGHTS_MARK}: these numbers test the tooling only.")
    return lines + [""]


def fmt_accuracy(row) -> str:
    if not row or row.get("value") is None:
        return "–"
    stderr = f" ± {row['stderr']:.3f}" if row.get("stderr") is not None else ""
    return f"{row['value']:.3f}{stderr}"


def fmt_speed(entry: dict) -> str:
    """The median per-round ratio, with the rounds' range where there are several (the noise)."""
    rounds = entry.get("speed_ratios") or []
    spread = f" ({min(rounds):.2f}–{max(rounds):.2f})" if len(rounds) > 1 else ""
    return f"{entry['speed_ratio']:.2f}×{spread}"


def md_where_sparsity_pays(run: dict) -> list[str]:
    """At 1%, 3% and 10% more perplexity: the fastest decoder-realisable configuration, its measured
    decode speed against dense, its distance from oracle at the same bytes and, where run, its
    downstream accuracy next to dense's."""
    pays = ((run["findings"]["perplexity"] or {}).get("where_sparsity_pays")) or None
    speed = run.get("decode_speed") or {}
    if pays is None:
        return []
    dense_task = pays.get("downstream_dense")
    task_note = []
    if dense_task:
        samples = f", {dense_task['samples']} items" if dense_task.get("samples") else ""
        task_note = [f"Downstream: {dense_task.get('task')} ({dense_task.get('metric')}{samples}), dense "
                     f"{fmt_accuracy(dense_task)}; chance is 0.25.", ""]
    task_head, task_rule = (" | task accuracy", "---|") if dense_task else ("", "")
    skipped = [kind for kind in ("bound", "masks") if speed.get("kinds") and kind not in speed["kinds"]]
    untimed = (f" This run timed no {' or '.join(skipped)} configuration (`--kinds`): their speed is "
               "left blank." if skipped else "")
    if speed.get("max_perplexity_change_pct") is not None:
        untimed += (f" It timed only the configurations within +{speed['max_perplexity_change_pct']:g}% perplexity of "
                    "dense (`--max-perplexity-change`), the only ones the budgets below can choose; the others' speed "
                    "is left blank.")
    lines = [f"### {run_heading(run)}: where sparsity pays", "",
             f"Decode speed measured by `dejavu_study.decode_speed` on {speed.get('machine')} "
             f"({speed.get('cpus')} cores) through the cpu backend at {speed.get('threads')} thread(s): "
             f"{speed.get('new_tokens')} tokens after a {speed.get('prompt_tokens')}-token prompt, median of "
             f"{speed.get('rounds')} per-round ratios against dense, their range in brackets (dense: "
             f"{fmt(speed.get('dense_rate'), 1)} tok/s). "
             "Only configurations a decoder can run count here: oracle chooses from the dense activation (a bound) "
             "and WINA has no kernel (masks)." + untimed, "", *task_note,
             "| perplexity budget | fastest within it | speed vs dense | perplexity vs dense | MLP bytes / dense "
             f"| oracle at those bytes | gap to oracle{task_head} |", f"|---|---|---|---|---|---|---|{task_rule}"]
    sentences = []
    for b in pays["budgets"]:
        task_cell = " – |" if dense_task else ""
        if b.get("method") is None:
            lines.append(f"| +{b['budget_pct']:g}% | none of the runs | – | – | – | – | – |{task_cell}")
            sentences.append(f"within +{b['budget_pct']:g}% perplexity no configuration was run")
            continue
        what = f"{b['method']} keep {b['keep']:g}"
        gap = "–" if b.get("minus_oracle_pp") is None else f"{b['minus_oracle_pp']:+.1f} pp"
        if dense_task:
            task_cell = f" {fmt_accuracy(b.get('downstream'))} |"
        lines.append(f"| +{b['budget_pct']:g}% | {what} | {fmt_speed(b)} | {fmt_pct(b['increase_pct'])} | "
                     f"{fmt(b.get('bytes_relative'), 2)} | {fmt_pct(b.get('oracle_increase_pct_at_bytes'))} | {gap} |"
                     f"{task_cell}")
        sentences.append(f"within +{b['budget_pct']:g}% perplexity " + (
            f"{what} decodes {b['speed_ratio']:.2f}× dense" if b["faster_than_dense"] else
            f"nothing decodes faster than dense (the fastest, {what}, runs at {b['speed_ratio']:.2f}×)"))
    return lines + ["", "In short: " + "; ".join(sentences) + ".", ""]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt_layers(layers) -> str:
    if not layers:
        return "none"
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(str(l) for l in layers)


def fmt_curve_point(point) -> str:
    nominal, kept, recall = point
    where = f"{nominal:g}" if kept is None or abs(kept - nominal) < 1e-9 else f"{nominal:g} (K/width {kept:.3g})"
    return f"{where} → {fmt(recall)}"


def run_heading(run: dict) -> str:
    return run["name"] + ("" if run["evidence"] else f" (**{RANDOM_WEIGHTS_MARK}**)")


def md_runs_table(summary: dict) -> list[str]:
    lines = ["| run | model | type | data | documents | tokens | label rule | layers | dump complete | weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in summary["runs"]:
        s, d = run["study"], run["dump"]
        weights = {True: f"**{RANDOM_WEIGHTS_MARK}**", False: "trained", None: "not stated"}[s["random_weights"]]
        complete = "yes" if d["complete"] else "**no**"
        if d["capacity_reached"]:
            complete += " (capacity reached)"
        lines.append(f"| {run['name']} | {s.get('model') or '?'} | {s.get('model_type') or d['model_type']} | "
                     f"{s.get('data') or '?'} | {s.get('documents') if s.get('documents') is not None else '?'} | "
                     f"{d['tokens']} | {label_rule_text(run)} | {len(d['layers'])} ({fmt_layers(d['layers'])}) | "
                     f"{complete} | {weights} |")
    return lines


def label_rule_text(run: dict) -> str:
    """study.json's label rule, else the rules recorded in the predictor metrics."""
    if run["study"].get("label_rule"):
        return run["study"]["label_rule"]
    parts = []
    for kind in KINDS:
        rules = sorted({rule for mode in MODES for rule in run["predictors"][kind][mode].get("label_rules") or []})
        if rules:
            parts.append(f"{'MLP' if kind == 'mlp' else 'heads'}: {', '.join(rules)}")
    return "; ".join(parts) or "?"


def md_run_details(run: dict) -> list[str]:
    s, d = run["study"], run["dump"]
    rows = str(d["rows_min"]) if d["rows_min"] == d["rows_max"] else f"{d['rows_min']}–{d['rows_max']}"
    lines = [f"- folder `{run['path']}`; checkpoint `{s.get('checkpoint') or '?'}`; stages {s.get('stages') or '?'}; "
             f"device {s.get('device') or '?'}",
             f"- dims: hidden {d['hidden_size']}, intermediate {d['intermediate_size']}, heads {d['num_heads']}; "
             f"rows per layer {rows} of capacity {d['capacity']}"]
    if s.get("notes"):
        lines.append(f"- notes: {s['notes']}")
    for kind in KINDS:
        for mode in MODES:
            p = run["predictors"][kind][mode]
            if p["status"] == "ok":
                lines.append(f"- {kind} predictors, input {mode} ({INPUT_DESCRIPTIONS[kind, mode]}): "
                             f"{plural(len(p['layers_ok']), 'layer')}; label rule {'; '.join(p['label_rules']) or '?'}")
    return lines


def md_recall_source(f: dict) -> str:
    """Where the recall figures were measured; with other documents, the held-out tokens' figure
    beside them (those tokens share passages with the training rows: the optimism on record)."""
    sources = f.get("recall_sources") or ["token_split"]
    if sources == ["other_documents"]:
        return (f" Measured on the validation passages' dump ({f['rows_other_documents']} rows of documents the "
                f"predictors never saw); on the held-out tokens of the training dump (same passages) recall is "
                f"{fmt(f['mean_token_split_recall'])} and recall at matched K "
                f"{fmt(f['mean_token_split_recall_at_matched_k'])}.")
    if sources == ["token_split"]:
        return " Measured on held-out tokens of the training dump (the same passages as the training rows)."
    return " Measured on other documents for some layers and on held-out tokens of the training dump for others."


def md_predictor_findings(run: dict) -> list[str]:
    lines = []
    for kind in KINDS:
        for mode in MODES:
            f = run["findings"]["predictors"][kind][mode]
            if f is None:
                lines.append(f"- {KIND_TITLES[kind]}, input {mode}: no predictor metrics.")
                continue
            below = f["layers_recall_below_floor"]
            lines.append(
                f"- {KIND_TITLES[kind]}, input {mode} ({INPUT_DESCRIPTIONS[kind, mode]}), {plural(f['layers'], 'layer')}: "
                f"mean recall {fmt(f['mean_recall'])} (min {fmt(f['min_recall'])} at layer {f['min_recall_layer']}, "
                f"max {fmt(f['max_recall'])}), mean precision {fmt(f['mean_precision'])}; "
                f"recall at matched K {fmt(f['mean_recall_at_matched_k'])} against chance ≈ "
                f"{fmt(f['mean_kept_fraction'])} (K/width); true sparsity {fmt(f['mean_true_sparsity'])}, "
                f"classifier sparsity {fmt(f['mean_classifier_sparsity'])}. "
                f"Layers with recall below {f['recall_floor']}: {fmt_layers(below) if below else 'none'} "
                f"({len(below)} of {f['layers']}). Recall slope {fmt(f['recall_slope_per_layer'], 4)} per layer; "
                f"first half {fmt(f['mean_recall_first_half'])}, second half {fmt(f['mean_recall_second_half'])}."
                + (" Recall of the top-K at kept fraction (mean over layers): "
                   + ", ".join(fmt_curve_point(p) for p in f["mean_recall_curve"]) + "."
                   if f.get("mean_recall_curve") else "")
                + (f" Best epoch at most {f['max_best_epoch']} of a cap of {f['epoch_cap']}"
                   + (f"; best at the cap (still improving when stopped): layer(s) {fmt_layers(f['layers_best_at_cap'])}"
                      if f["layers_best_at_cap"] else "; every layer stopped early") + "."
                   if f.get("max_best_epoch") and f.get("epoch_cap") else "")
                + (f" Trained on the layer's own input instead (no earlier layer): layer(s) "
                   f"{fmt_layers(f['layers_input_fallback'])}." if f.get("layers_input_fallback") else "")
                + md_recall_source(f))
    for kind in KINDS:
        la = run["findings"]["lookahead"][kind]
        if la is None:
            continue
        corr = la["corr_prev_recall_at_matched_k_vs_input_cosine"]
        lines.append(
            f"- Look-ahead, {KIND_TITLES[kind]} ({plural(la['layers'], 'layer')} with both inputs): recall prev − same "
            f"{fmt(la['mean_recall_prev_minus_same'], 3)}, recall at matched K prev − same "
            f"{fmt(la['mean_recall_at_matched_k_prev_minus_same'], 3)}; correlation across "
            f"{plural(la['corr_layers'], 'layer')} of look-ahead recall at matched K with the cosine between the look-ahead "
            f"input and the layer's own input: r = {fmt(corr, 2)}"
            + (" (undefined: too few layers or no variation)" if corr is None else "") + ".")
    return lines


def md_drift_findings(run: dict) -> list[str]:
    f = run["findings"]["drift"]
    if f is None:
        return [f"- Drift: not available ({run['drift'].get('reason', 'no drift data')})."]
    names = {"cos_next_layer": "cosine of att_x_l with att_x_{l+1}", "cos_mlp_x": "cosine of att_x_l with mlp_x_l",
             "rel_change_next_layer": "relative change |att_x_{l+1} − att_x_l| / |att_x_l|",
             "rel_change_mlp_x": "relative change |mlp_x_l − att_x_l| / |att_x_l|"}
    lines = []
    for field in DRIFT_FIELDS:
        d = f.get(field)
        if d is None:
            continue
        lines.append(f"- Drift, {names[field]}: mean over {plural(d['layers'], 'layer')} {fmt(d['mean'])} "
                     f"(min {fmt(d['min'])} at layer {d['min_layer']}, max {fmt(d['max'])} at layer {d['max_layer']}; "
                     f"first half {fmt(d['mean_first_half'])}, second half {fmt(d['mean_second_half'])}).")
    depth = run["findings"].get("depth")
    if depth:
        rho = depth["spearman_recall_vs_drift"]
        lines.append(f"- Recall against drift and depth ({plural(len(depth['layers']), 'layer')}, MLP predictors, input "
                     f"same, recall at matched K; Spearman's rank correlation): with depth "
                     f"{fmt(depth['spearman_recall_vs_depth'])}; with cos(att_x_l, att_x_l+1), the similarity of "
                     f"consecutive layers' inputs, {fmt(rho.get('cos_next_layer'))}; with cos(att_x_l, mlp_x_l) "
                     f"{fmt(rho.get('cos_mlp_x'))}; cos(att_x_l, att_x_l+1) with depth "
                     f"{fmt(depth['spearman_drift_vs_depth'].get('cos_next_layer'))} (recall_vs_drift.png).")
    source = run["drift"]
    lines.append(f"- Drift source: {source.get('source')} "
                 f"({'all valid rows' if source.get('max_rows') is None else 'first ' + str(source['max_rows']) + ' rows'}).")
    return lines


def md_perplexity_findings(run: dict) -> list[str]:
    f = run["findings"]["perplexity"]
    if f is None:
        return ["- Perplexity: no results."]
    lines = [f"- Dense perplexity: {fmt(f['dense'], 3)}."]
    for item in f["at_kept_fraction"]:
        where = ", ".join(f"{name} keep {item[key]:g}" for name, key in (("MLP", "mlp_keep"), ("attention", "att_keep"))
                          if item[key] is not None) or "default keep"
        gap = item.get("predicted_over_oracle_pct")
        parts = []
        for name in ("oracle", "predicted"):
            if not item.get(f"{name}_run"):
                parts.append(f"{name} not run")
            elif item[name] is None:
                parts.append(f"{name} {item.get(f'{name}_raw')} (not finite)")
            else:
                parts.append(f"{name} {fmt(item[name], 3)} ({fmt_pct(item[f'{name}_increase_pct'])} vs dense)")
        lines.append(f"- {where}: {', '.join(parts)}" + (f"; predicted is {fmt_pct(gap)} vs oracle" if gap is not None else "") + ".")
    return lines


def md_comparison(summary: dict) -> list[str]:
    comp = summary.get("comparison")
    if not comp:
        return []
    lines = ["## Comparison", "",
             "Means over layers, side by side. Runs marked with random weights are shown for completeness only.", "",
             "| run | MLP recall same | MLP recall prev | MLP rec@K same | att recall same | att recall prev | "
             "att rec@K prev | cos next layer | cos mlp_x | rel change |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in comp["rows"]:
        name = row["run"] + ("" if row["evidence"] else f" ({RANDOM_WEIGHTS_MARK})")
        lines.append(f"| {name} | {fmt(row['mlp_same_mean_recall'])} | {fmt(row['mlp_prev_mean_recall'])} | "
                     f"{fmt(row['mlp_same_mean_recall_at_matched_k'])} | {fmt(row['att_same_mean_recall'])} | "
                     f"{fmt(row['att_prev_mean_recall'])} | {fmt(row['att_prev_mean_recall_at_matched_k'])} | "
                     f"{fmt(row['mean_cos_next_layer'])} | {fmt(row['mean_cos_mlp_x'])} | "
                     f"{fmt(row['mean_rel_change_next_layer'])} |")
    evidence = [r for r in comp["rows"] if r["evidence"]]
    for key, label in (("mlp_same_mean_recall", "mean MLP recall (input same)"),
                       ("att_prev_mean_recall", "mean attention recall (look-ahead input)"),
                       ("mean_cos_next_layer", "mean cosine between consecutive layers")):
        values = [(r["run"], r[key]) for r in evidence if r[key] is not None]
        if len(values) >= 2:
            hi, lo = max(values, key=lambda v: v[1]), min(values, key=lambda v: v[1])
            lines.append(f"- {label}: highest {hi[0]} ({fmt(hi[1])}), lowest {lo[0]} ({fmt(lo[1])}), "
                         f"difference {fmt(hi[1] - lo[1])}.")
    return lines + [""]


def md_layer_table(run: dict) -> list[str]:
    lines = [f"### {run_heading(run)}: per layer", "",
             "| layer | rows | MLP recall same | MLP recall prev | MLP rec@K same | MLP true sp | MLP clf sp same | "
             "att recall same | att recall prev | att rec@K prev | att true sp | cos next | cos mlp_x | rel change |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for l in run["layers"]:
        def p(kind, mode, field):
            return fmt((l[kind][mode] or {}).get(field))

        def true_sp(kind):
            return fmt(next(((l[kind][m] or {}).get("true_sparsity") for m in MODES if l[kind][m]), None))

        def d(field):
            return fmt(((l["drift"] or {}).get(field) or {}).get("mean"))

        lines.append(f"| {l['layer']} | {l['rows']} | {p('mlp', 'same', 'recall')} | {p('mlp', 'prev', 'recall')} | "
                     f"{p('mlp', 'same', 'recall_at_matched_k')} | {true_sp('mlp')} | "
                     f"{p('mlp', 'same', 'classifier_sparsity')} | {p('att', 'same', 'recall')} | "
                     f"{p('att', 'prev', 'recall')} | {p('att', 'prev', 'recall_at_matched_k')} | {true_sp('att')} | "
                     f"{d('cos_next_layer')} | {d('cos_mlp_x')} | {d('rel_change_next_layer')} |")
    return lines + [""]


DEJAVU_OPT_REFERENCE = [
    "Reference, not measured here: DejaVu on OPT (Liu et al., *Deja Vu: Contextual Sparsity for Efficient LLMs "
    "at Inference Time*, ICML 2023) reports that contextual sparsity in OPT's attention heads and ReLU MLPs can "
    "be predicted layer by layer from the layer's input, and that DejaVu reduces the inference latency of "
    "OPT-175B by over 2× against FasterTransformer and over 6× against the Hugging Face implementation "
    "without compromising model quality (perplexity on WikiText and C4, seven few-shot tasks); its predictors "
    "were trained on activations of 500 C4 training documents. A measured OPT run (e.g. `MODEL=facebook/opt-125m "
    "MODEL_TYPE=opt ONLINE=1 bash scripts/demo.sh` on a server) overlays here with `scripts/report.py RUN RUN`.",
]


def fmt_reached(reached) -> str:
    """A kept fraction reached, or one per masked input (teal, wina: "in 0.497, down 0.483")."""
    if isinstance(reached, dict):
        return ", ".join(f"{name} {value:.3f}" for name, value in sorted(reached.items(), key=lambda kv: kv[0] != "in"))
    return fmt(reached)


def md_frontier_table(run: dict) -> list[str]:
    """Every MLP method at every kept fraction: kept fraction reached on the validation text, bytes, quality."""
    frontier = ((run["findings"]["perplexity"] or {}).get("mlp_frontier") or {}).get("methods")
    if not frontier:
        return []
    lines = [f"### {run_heading(run)}: MLP methods against bytes read and decode time", "",
             "| method | keep (target) | kept reached (validation) | MLP bytes / dense | perplexity vs dense "
             "| decode speed vs dense |", "|---|---|---|---|---|---|"]
    for mode, points in frontier.items():
        for p in points:
            speed = "–" if p.get("speed_ratio") is None else f"{p['speed_ratio']:.2f}×" + (
                "" if p.get("speed_kind") == "kernel" else f" ({p.get('speed_kind')})")
            lines.append(f"| {mode} | {p['keep']:g} | {fmt_reached(p['reached_keep'])} | {fmt(p['bytes_relative'])} | "
                         f"{fmt_pct(p['increase_pct'])} | {speed} |")
    return lines + ["", "Kept reached: the mean over layers and masked inputs of the fraction kept per token "
                        "(thresholds calibrated on the training documents drift on new text). Bytes: MLP weights "
                        "read per token from the shapes and the kept counts (the predictor's own weights for "
                        "predicted, the whole gate for cats; teal and wina read columns). \"allocated\": each layer "
                        "its own kept fraction (an allocation file), the target being their mean. Decode speed: "
                        "see \"where sparsity pays\"; bound: oracle, which chooses from the dense activation; "
                        "masks: no kernel, the masked MLP in torch ops.", ""]


def md_perplexity_table(run: dict) -> list[str]:
    entries = run["perplexity"]["entries"]
    if not entries:
        return []
    lines = [f"### {run_heading(run)}: perplexity runs", "",
             "| mode | MLP keep | att keep | perplexity | vs dense | tokens | result file |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        ppl = fmt(e["perplexity"]) if e["perplexity"] is not None else f"{e.get('perplexity_raw')} (not finite)"
        keep = lambda v: "–" if v is None else f"{v:g}"  # noqa: E731
        lines.append(f"| {e['mode']} | {keep(e['mlp_keep'])} | {keep(e['att_keep'])} | {ppl} | "
                     f"{fmt_pct(e.get('increase_pct'))} | {e.get('tokens')} | {e.get('result_file') or ''} |")
    return lines + [""]


PLOT_CAPTIONS = {
    "recall": "Recall per layer (solid: input same, dashed: input prev; dotted line: recall floor), on the "
              "validation passages' dump where there is one, else on held-out tokens of the training dump.",
    "sparsity": "True sparsity of the labels (solid) and the classifier's predicted sparsity (dashed).",
    "drift": "Residual-stream drift per layer: mean over tokens with the p10–p90 band.",
    "recall_vs_drift": "Each layer's MLP recall at matched K against the cosine of its input with the next "
                       "layer's (left; the numbers are layers) and both against depth (right).",
    "perplexity": "Perplexity against the kept fraction: dense (dotted), oracle top-K (solid), predicted (dashed).",
    "frontier": "MLP made sparse alone: perplexity change against the MLP weight bytes each method reads per token "
                "(relative to dense; the predictor's weights and CATS's full gate included), one line per method.",
    "frontier_time": "MLP made sparse alone: perplexity change against measured decode speed relative to dense "
                     "(cpu backend), one line per method; dashed: per-layer allocated budgets; hollow markers: "
                     "not realisable (oracle, a bound) or masks without a kernel (wina).",
    "recall_vs_k": "Recall of the top-K predicted units against K/width: points are recall at matched K "
                   "(one per layer), lines the recall at fixed kept fractions (mean over layers); "
                   "the diagonal is chance.",
}


def render_markdown(summary: dict) -> str:
    """The whole report, from summary.json's contents only."""
    runs = summary["runs"]
    lines = [f"# DejaVu-Llama study report: {summary['name']}", "",
             f"Generated {summary['generated']} by `scripts/report.py` from `summary.json` "
             f"({len(runs)} run{'s' if len(runs) != 1 else ''}).", ""]
    for run in runs:
        if not run["evidence"]:
            lines += [f"> **{run['name']}: {RANDOM_WEIGHTS_MARK}.** Its model has random weights (study.json "
                      "`random_weights: true`); its numbers test the tooling, not the hypothesis.", ""]
    lines += ["## Answer", "",
              f"How far each component can be cut before perplexity rises more than {PERPLEXITY_TOLERANCE_PCT:g}% "
              "over dense, with the layer's own activations choosing what to keep (oracle) and with the trained "
              "predictors choosing (predicted). The gap between the two is the predictors' share; the gap "
              "between oracle and dense is the model's.", ""]
    for run in runs:
        lines += md_headline(run)
    for run in runs:
        lines += md_where_sparsity_pays(run)
    c = summary.get("controls")
    if c:
        lines += [f"Why the predictors fall short (controls on {c['model']}, layers {c['layers']}): {c['sentence']} "
                  f"See the [controls report]({c['link']}).", ""]
    lines += ["> " + line for line in DEJAVU_OPT_REFERENCE] + [""]
    lines += ["## Runs", ""] + md_runs_table(summary) + [""]
    lines += ["Definitions: *recall* = fraction of truly active units the classifier marks active (sigmoid ≥ 0.5); "
              "*recall at matched K* = recall of each token's top-K predicted units with K = its true active count "
              "(chance ≈ K/width); *true sparsity* = fraction of label entries inactive; *classifier sparsity* = "
              "fraction predicted inactive; label rule *topk (k)* = a token's ceil(k × width) largest |activation| "
              "(SiLU(gate)·up or ReLU(fc1) per neuron, output norm per head) are its active units. "
              "Input *same* / *prev*: see each run's predictor lines.", ""]
    lines += ["## Findings", ""]
    for run in runs:
        lines += [f"### {run_heading(run)}", ""] + md_run_details(run)
        lines += md_predictor_findings(run) + md_drift_findings(run) + md_perplexity_findings(run) + [""]
    lines += md_comparison(summary)
    lines += ["## Plots", ""]
    for key, filename, _ in PLOTS:
        if key in summary["plots"]:
            lines += [f"![{key}]({summary['plots'][key]})", "", PLOT_CAPTIONS[key], ""]
        elif summary.get("plots_skipped"):
            lines += [f"- {key}: not drawn (--no-plots).", ""]
        else:
            lines += [f"- {key}: no plot (no data in any run).", ""]
    if summary.get("downstream") is not None:
        lines += ["## Downstream tasks (lm-evaluation-harness)", "", render_downstream(summary["downstream"]), ""]
    lines += ["## Per-layer numbers", ""]
    for run in runs:
        lines += md_layer_table(run) + md_perplexity_table(run) + md_frontier_table(run)
    lines += ["## Missing pieces and warnings", ""]
    for run in runs:
        items = [f"missing: {m}" for m in run["missing"]] + [f"warning: {w}" for w in run["warnings"]]
        lines += [f"- {run['name']}: " + ("nothing missing" if not items else items[0])]
        lines += [f"  - {item}" for item in items[1:]]
    return "\n".join(lines) + "\n"
