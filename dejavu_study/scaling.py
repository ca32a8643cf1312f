"""Scaling report: predictor quality and sparse perplexity against training-set size.

    python -m dejavu_study.scaling RUN [--out DIR] [--model NAME] [--layers SPEC]

RUN is what scripts/scaling.sh writes:
    dump/meta.json                       the collected layer subset
    train.jsonl, val.jsonl               the request files (each request names its corpus source)
    predictors/rows{N}_k{k}/metrics_mlp.jsonl   one training set size N and label k per folder
    scaling.jsonl                        perplexity lines: mode (dense | oracle | predicted), keep,
                                         train_rows, label_k, perplexity, tokens
    timings.jsonl                        seconds per step, the dump's bytes

Output in DIR: summary.json (every number), scaling.md (rendered from it), recall_vs_tokens.png and
perplexity_vs_tokens.png (log x). The report states the trend between the sizes measured and the
gap to oracle at each; it does not extrapolate past the largest size.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import sys
from collections import Counter

from dejavu_common.helpers import atomic_write, write_json_atomic, write_text_atomic
from dejavu_study.report.markdown import fmt, fmt_pct
from dejavu_study.report.runs import ReportError, mean, read_json_file, read_jsonl

log = logging.getLogger(__name__)

PREDICTOR_DIR = re.compile(r"rows(\d+)_k([0-9.]+)$")
FIELDS = ("recall", "precision", "recall_at_matched_k")


def jsonl_lines(path: str, required: bool = True) -> list[dict]:
    """The JSON lines of `path`; a missing file is a ReportError naming it (or [] if not required)."""
    if not os.path.isfile(path):
        if required:
            raise ReportError(f"missing file: {path}")
        return []
    return read_jsonl(path)[0]


def read_predictors(run: str) -> list[dict]:
    """One record per predictors/rows{N}_k{k} folder: per layer the latest ok metrics line."""
    folder = os.path.join(run, "predictors")
    if not os.path.isdir(folder):
        raise ReportError(f"no predictors folder: {folder}")
    sets = []
    for name in sorted(os.listdir(folder)):
        match = PREDICTOR_DIR.match(name)
        if not match:
            continue
        entries = jsonl_lines(os.path.join(folder, name, "metrics_mlp.jsonl"), required=False)
        layers = {}
        for entry in entries:
            if entry.get("status") == "ok" and entry.get("kind") == "mlp":
                layers[int(entry["layer"])] = entry
        if not layers:
            continue
        ordered = [layers[l] for l in sorted(layers)]
        sets.append({
            "train_rows": int(match.group(1)), "label_k": float(match.group(2)),
            "layers": sorted(layers),
            "rows_train": [e.get("rows_train") for e in ordered],
            "rows_val": [e.get("rows_val") for e in ordered],
            **{f"mean_{f}": mean(e["val"].get(f) for e in ordered) for f in FIELDS},
            "per_layer": {str(e["layer"]): {f: e["val"].get(f) for f in FIELDS} for e in ordered},
            "best_epoch": [e.get("best_epoch") for e in ordered],
            "epochs_run": [e.get("epochs_run") for e in ordered],
            "epoch_cap": max(e.get("epochs") or 0 for e in ordered),
            "D": ordered[0].get("D"), "lr": ordered[0].get("lr"), "batch_size": ordered[0].get("batch_size"),
            "patience": ordered[0].get("patience"), "select_metric": ordered[0].get("select_metric"),
            "seconds": sum(e.get("seconds") or 0 for e in ordered),
        })
    if not sets:
        raise ReportError(f"no trained predictors under {folder}")
    return sorted(sets, key=lambda s: (s["label_k"], s["train_rows"]))


def read_perplexity(run: str) -> dict:
    """{dense, oracle: {keep: ppl}, predicted: {(train_rows, label_k, keep): ppl}} from scaling.jsonl."""
    entries = jsonl_lines(os.path.join(run, "scaling.jsonl"))
    out = {"dense": None, "tokens": None, "oracle": {}, "predicted": {}}
    for e in entries:
        if e.get("mode") == "dense":
            out["dense"], out["tokens"] = e.get("perplexity"), e.get("tokens")
        elif e.get("mode") == "oracle":
            out["oracle"][e["keep"]] = e.get("perplexity")
        elif e.get("mode") == "predicted":
            out["predicted"][(e["train_rows"], e["label_k"], e["keep"])] = e.get("perplexity")
    if out["dense"] is None:
        raise ReportError(f"no dense perplexity line in {os.path.join(run, 'scaling.jsonl')}")
    return out


def change_pct(value, dense):
    return None if value is None or not dense else 100.0 * (value / dense - 1.0)


def corpus_of(run: str) -> dict:
    """Documents per source in the training and validation request files, and the sources' licences."""
    split_counts = {}
    for split, name in (("train", "train.jsonl"), ("validation", "val.jsonl")):
        entries = jsonl_lines(os.path.join(run, name), required=False)
        split_counts[split] = dict(Counter(e.get("source", "unknown") for e in entries))
    from dejavu_llama.task_datasets.offline_text import SOURCES

    licences = {name: source.licence for name, source in SOURCES.items()}
    return {"documents": split_counts, "licences": licences}


def build_summary(run: str, model: str, layer_spec: str) -> dict:
    meta = read_json_file(os.path.join(run, "dump", "meta.json"), "dump metadata file")
    predictors = read_predictors(run)
    ppl = read_perplexity(run)
    timings = jsonl_lines(os.path.join(run, "timings.jsonl"), required=False)
    dense = ppl["dense"]
    keeps = sorted({k for k in ppl["oracle"]} | {k for (_, _, k) in ppl["predicted"]}, reverse=True)
    counts = Counter(s["label_k"] for s in predictors)
    sweep_k = max(counts, key=lambda k: (counts[k], -k))  # the label trained at the most sizes
    sizes = []
    for s in predictors:
        row = {**{k: v for k, v in s.items() if k != "per_layer"}, "per_layer": s["per_layer"], "perplexity": {}}
        for keep in keeps:
            value = ppl["predicted"].get((s["train_rows"], s["label_k"], keep))
            oracle = ppl["oracle"].get(keep)
            row["perplexity"][str(keep)] = {
                "predicted": value, "predicted_change_pct": change_pct(value, dense),
                "oracle": oracle, "oracle_change_pct": change_pct(oracle, dense),
                "gap_to_oracle_pct": None if value is None or oracle is None else change_pct(value, oracle)}
        sizes.append(row)
    return {
        "format": "dejavu-llama-scaling", "version": 1,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run": os.path.abspath(run), "model": model or meta.get("model"), "layers": meta.get("layers"),
        "layer_spec": layer_spec, "num_layers": meta.get("num_layers"), "dump_tokens": meta.get("tokens"),
        "corpus": corpus_of(run), "dense_perplexity": dense, "validation_tokens": ppl["tokens"],
        "keeps": keeps, "sweep_label_k": sweep_k, "sets": sizes,
        "timings": {t["step"]: t.get("seconds", t.get("bytes")) for t in timings},
    }


def sweep(summary: dict) -> list[dict]:
    return [s for s in summary["sets"] if s["label_k"] == summary["sweep_label_k"]]


def make_plots(summary: dict, out: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep(summary)
    tokens = [s["train_rows"] for s in rows]
    written = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for field, label in (("mean_recall_at_matched_k", "recall at matched K"), ("mean_recall", "recall"),
                         ("mean_precision", "precision")):
        ax.plot(tokens, [s[field] for s in rows], marker="o", label=label)
    ax.set(xscale="log", xlabel="training tokens (log)", ylabel=f"mean over layers {summary['layer_spec']}",
           title=f"MLP predictor quality vs training tokens (label k={summary['sweep_label_k']:g})")
    ax.grid(alpha=0.3)
    ax.legend()
    written["recall"] = save(fig, plt, os.path.join(out, "recall_vs_tokens.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for keep in summary["keeps"]:
        line = ax.plot(tokens, [s["perplexity"][str(keep)]["predicted_change_pct"] for s in rows], marker="o",
                       label=f"predicted, keep {keep:g}")
        oracle = rows[0]["perplexity"][str(keep)]["oracle_change_pct"] if rows else None
        if oracle is not None:
            ax.axhline(oracle, linestyle="--", color=line[0].get_color(), label=f"oracle, keep {keep:g}")
    ax.set(xscale="log", xlabel="training tokens (log)", ylabel="perplexity change vs dense (%)",
           title=f"MLP sparsity on layers {summary['layer_spec']} (others dense)")
    ax.grid(alpha=0.3)
    ax.legend()
    written["perplexity"] = save(fig, plt, os.path.join(out, "perplexity_vs_tokens.png"))
    return written


def save(fig, plt, path: str) -> str:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return os.path.basename(path)


def training_text(summary: dict) -> str:
    first = sweep(summary)[0] if sweep(summary) else summary["sets"][0]
    return (f"predictor width D = {first['D']}, AdamW lr {first['lr']}, batch {first['batch_size']}, "
            f"{first['rows_val'][0]:,} validation rows; the epoch with the best {first['select_metric']} is kept "
            f"and training stops after {first['patience']} epochs without a better one, under a cap of "
            f"{first['epoch_cap']} epochs.")


def trend_text(summary: dict) -> list[str]:
    rows = sweep(summary)
    if len(rows) < 2:
        return ["Only one training-set size was measured: there is no trend to state."]
    first, last = rows[0], rows[-1]
    lines = [f"Between {first['train_rows']:,} and {last['train_rows']:,} training tokens (the sizes measured), "
             f"mean recall at matched K went from {fmt(first['mean_recall_at_matched_k'])} to "
             f"{fmt(last['mean_recall_at_matched_k'])}."]
    for keep in summary["keeps"]:
        values = [s["perplexity"][str(keep)] for s in rows]
        gaps = ", ".join(f"{s['train_rows']:,}: {fmt_pct(v['predicted_change_pct'])} (gap to oracle "
                         f"{fmt_pct(v['gap_to_oracle_pct'])})" for s, v in zip(rows, values))
        lines.append(f"At keep {keep:g}, predicted perplexity change by size: {gaps}; oracle "
                     f"{fmt_pct(values[0]['oracle_change_pct'])}.")
    lines.append("These figures describe the sizes measured; nothing here is extrapolated beyond "
                 f"{last['train_rows']:,} tokens.")
    return lines


def render_markdown(summary: dict, plots: dict) -> str:
    corpus = summary["corpus"]
    lines = [f"# Predictor scaling: {summary['model']}", "",
             f"Generated {summary['generated']} from `{summary['run']}`.", "", "## What was measured", "",
             f"- Layers {summary['layer_spec']} of {summary['num_layers']} (the others stay dense in every "
             "perplexity run); MLP predictors only, attention dense.",
             f"- One activation dump of {summary['dump_tokens']:,} tokens; every size trains on the first N "
             "training rows and is validated on the same held-out rows.",
             f"- Label of the size sweep: top-k with k = {summary['sweep_label_k']:g}; " + training_text(summary),
             f"- Perplexity on {summary['validation_tokens']:,} validation tokens (documents never collected); "
             f"dense perplexity {fmt(summary['dense_perplexity'], 2)}.",
             "- Corpus: " + "; ".join(
                 f"{name} ({corpus['licences'].get(name, 'licence not recorded')}): "
                 f"{corpus['documents']['train'].get(name, 0)} training / "
                 f"{corpus['documents']['validation'].get(name, 0)} validation passages (requests)"
                 for name in sorted(set(corpus['documents']['train']) | set(corpus['documents']['validation']))),
             "", "## Trend", "", *[f"- {line}" for line in trend_text(summary)], "",
             "## Per training-set size", "",
             "| label k | training tokens | recall | precision | recall at matched K | best epoch (max) / cap | "
             + " | ".join(f"ppl keep {k:g}: predicted / oracle" for k in summary["keeps"]) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(summary["keeps"])]
    for s in summary["sets"]:
        cells = [f"{s['label_k']:g}", f"{s['train_rows']:,}", fmt(s["mean_recall"]), fmt(s["mean_precision"]),
                 fmt(s["mean_recall_at_matched_k"]),
                 f"{max(e for e in s['best_epoch'] if e is not None)} / {s['epoch_cap']}"]
        for keep in summary["keeps"]:
            p = s["perplexity"][str(keep)]
            cells.append(f"{fmt_pct(p['predicted_change_pct'])} / {fmt_pct(p['oracle_change_pct'])}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Labels at the budget", ""]
    budget = [s for s in summary["sets"] if s["label_k"] != summary["sweep_label_k"]]
    if not budget:
        lines.append("No predictor was trained with another label.")
    for s in budget:
        base = next((b for b in sweep(summary) if b["train_rows"] == s["train_rows"]), None)
        for keep in summary["keeps"]:
            p = s["perplexity"][str(keep)]
            if p["predicted"] is None:
                continue
            other = base["perplexity"][str(keep)]["predicted_change_pct"] if base else None
            better = None if other is None else ("k = the kept fraction" if p["predicted_change_pct"] < other
                                                 else f"k = {summary['sweep_label_k']:g}")
            lines.append(f"- {s['train_rows']:,} tokens, keep {keep:g}: label k = {s['label_k']:g} gives "
                         f"{fmt_pct(p['predicted_change_pct'])}, label k = {summary['sweep_label_k']:g} gives "
                         f"{fmt_pct(other)} (oracle {fmt_pct(p['oracle_change_pct'])}): {better or '–'} serves "
                         "this kept fraction better.")
    t = summary["timings"]
    lines += ["", "## Cost of this run", "",
              f"- Collection {t.get('collect', 0) / 60:.1f} min, training {t.get('train', 0) / 60:.1f} min, "
              f"perplexity runs {t.get('perplexity', 0) / 60:.1f} min; dump "
              f"{(t.get('dump_bytes') or 0) / 2 ** 30:.2f} GiB.", "", "## Plots", ""]
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/report)")
    parser.add_argument("--model", default="", help="model name for the report (default: meta.json's)")
    parser.add_argument("--layers", default="", help="the layer spec the run used, for the text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[scaling] %(levelname)s: %(message)s", stream=sys.stderr)
    out = args.out or os.path.join(args.run, "report")
    try:
        summary = build_summary(args.run, args.model, args.layers or "")
        os.makedirs(out, exist_ok=True)
        plots = make_plots(summary, out)
        write_json_atomic(os.path.join(out, "summary.json"), summary)
        write_text_atomic(os.path.join(out, "scaling.md"), render_markdown(summary, plots))
    except ReportError as error:
        log.error("%s", error)
        return 1
    log.info("wrote %s", os.path.join(out, "scaling.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
