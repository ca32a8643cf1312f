"""Decode time of every sparse MLP method on SmolLM2, beside the kept fraction it reached and the
MLP bytes it read: the measured cost of oracle-free selection, per method and kept fraction.

    .venv/bin/python benchmarks/bench_training_free.py [--quick] [--threads 1] [--allocation FILE ...] [--json PATH]

SmolLM2-135M-Instruct (the embedded model), float32, CPU, batch 1, the cpu decode backend (C
kernels). One process, one model:
  1. calibration: the MLP input of every layer over --calibration-tokens tokens of the offline
     corpus's training passages; TEAL's and CATS's thresholds for each kept fraction from them
     (sparse_predictor.calibration, as calibrate.py computes them from a dump);
  2. decoding: a validation passage as the prompt (--prompt-tokens), then --new-tokens greedy
     tokens, for each method at each kept fraction and for dense right before it (each ratio is
     to that dense run): tok/s = N / (t(1 + N) - t(1)), the median of --repeats; a second run
     with --sparse-stats's counting gives the kept fraction reached on those tokens and the MLP
     bytes per token relative to dense (sparse_cost.py);
  3. with --allocation FILE ...: the same for each allocation file's per-layer kept fractions
     (sparse_predictor/allocate.py), teal's and cats's thresholds calibrated as in 1.
Methods: teal and cats through their C kernels (decode/cpu_training_free.py), wina as masks in
torch ops (no kernel: it reads everything), predicted with random predictors at upstream's share
of the MLP's bytes (speed only: what it keeps means nothing here). The kept fractions and the
bytes are those of these tokens; the speeds, of this machine in this run.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from support import (DEFAULT_CHECKPOINT, ensure_checkpoint, format_table, matched_rank, random_predictors, result_path,
                     write_json)

KEEPS = (0.5, 0.25, 0.1)
METHODS = ("teal", "cats", "wina", "predicted")


def corpus_tokens(tokenizer, split, count):
    """The first `count` tokens of the offline corpus's passages of `split`, one passage after another."""
    from dejavu_llama.task_datasets.offline_text import offline_documents

    ids = []
    for passage in offline_documents(split):
        ids += tokenizer(passage.text)["input_ids"]
        if len(ids) >= count:
            break
    if len(ids) < count:
        sys.exit(f"the offline corpus gave {len(ids)} {split} tokens, {count} wanted (scripts/setup.sh installs it)")
    return ids[:count]


def mlp_inputs(model, token_ids, chunk=256):
    """{layer: [tokens, d]}: each layer's MLP input over the tokens (a pre-hook on block.mlp, the
    module sparse execution installs: a dense block runs its MLP in two halves, not as a call)."""
    from dejavu_llama.modules.sparse_execution import configure_sparse

    configure_sparse(list(model.blocks), "dense")
    captured, hooks = {}, []
    for block in model.blocks:
        def record(module, args, layer=block.layer_index):
            captured.setdefault(layer, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
        hooks.append(block.mlp.register_forward_pre_hook(record))
    try:
        for start in range(0, len(token_ids), chunk):
            model(torch.tensor([token_ids[start:start + chunk]]))
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: torch.cat(parts) for layer, parts in captured.items()}


def calibrated_thresholds(model, inputs, keeps):
    """{method: {keep: {layer: thresholds}}} for teal and cats."""
    from sparse_predictor.calibration import calibrate_cats, calibrate_teal

    found = {"teal": {keep: {} for keep in keeps}, "cats": {keep: {} for keep in keeps}}
    with torch.inference_mode():
        for block in model.blocks:
            h = inputs[block.layer_index]
            for method, calibrate in (("teal", calibrate_teal), ("cats", calibrate_cats)):
                for keep, entry in calibrate(block, h, list(keeps), 1024).items():
                    found[method][keep][block.layer_index] = {k: v for k, v in entry.items() if k != "reached"}
    return found


def allocation_options(path, model, inputs, predictors):
    """(method, configure_sparse options) of an allocation file (sparse_predictor/allocate.py): its
    per-layer kept fractions, with teal's or cats's thresholds calibrated here at those fractions."""
    from dejavu_common.allocation_format import AllocationError, load_allocation

    try:
        data = load_allocation(path)
    except AllocationError as error:
        sys.exit(str(error))
    method, layers = data["method"], {int(layer): keep for layer, keep in data["layers"].items()}
    options = dict(mlp_keep_file=path, sparse_attention=False)
    if method == "predicted":
        options["predictors"] = predictors
    else:
        fractions = sorted({keep for keep in layers.values() if keep < 1})
        found = calibrated_thresholds(model, inputs, fractions)[method] if fractions else {}
        options["thresholds"] = {layer: found[keep][layer] for layer, keep in layers.items() if keep < 1}
    return method, options


def mean_kept(summary):
    """{input: kept fraction} averaged over the sparse layers of a --sparse-stats summary."""
    values = {}
    for entry in summary["layers"].values():
        for name, value in (entry.get("kept") or {}).items():
            values.setdefault(name, []).append(value)
    return {name: sum(found) / len(found) for name, found in values.items()}


def decode_rate(model, prompt, new_tokens, repeats):
    def run(count):
        return model.generate_greedy(prompt, count, backend="cpu")

    def timed(count):
        run(count)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(count)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return new_tokens / (timed(1 + new_tokens) - timed(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=os.environ.get("CHECKPOINT", DEFAULT_CHECKPOINT))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1024 calibration tokens, 16 new tokens, 2 repeats")
    parser.add_argument("--allocation", nargs="+", default=[], metavar="FILE",
                        help="also time these allocation files (sparse_predictor/allocate.py: per-layer kept "
                             "fractions of predicted, teal or cats; thresholds calibrated here at their fractions)")
    parser.add_argument("--json", default=result_path("training_free"))
    args = parser.parse_args(argv)
    if args.quick:
        args.calibration_tokens, args.new_tokens, args.repeats = 1024, 16, 2
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from dejavu_llama.modules import cpu_kernels
    from dejavu_llama.modules.local_model import LocalModel
    from dejavu_llama.modules.sparse_execution import configure_sparse
    from dejavu_llama.modules.sparse_stats import SparseStats

    cpu_kernels.set_num_threads(args.threads)
    checkpoint = ensure_checkpoint(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse", backend="cpu")
    config = model.config
    log = lambda message: print(message, flush=True)  # noqa: E731
    started = time.perf_counter()
    inputs = mlp_inputs(model, corpus_tokens(tokenizer, "train", args.calibration_tokens))
    thresholds = calibrated_thresholds(model, inputs, KEEPS)
    rank = matched_rank(config.hidden_size, config.intermediate_size)
    predictors = random_predictors(config, rank)
    log(f"calibrated on {args.calibration_tokens} tokens in {time.perf_counter() - started:.0f} s")
    prompt = torch.tensor([corpus_tokens(tokenizer, "validation", args.prompt_tokens)])
    case = (f"SmolLM2-135M, float32, batch 1, prompt {args.prompt_tokens}, {args.new_tokens} new, "
            f"{args.threads} thread(s)")
    blocks = list(model.blocks)

    def timed_row(method, options, label, extra_note=""):
        # Dense right before each method, so load on the machine hits the pair alike (a
        # dense configuration lays the MLP's rows back: the dense layer kernel reads them).
        configure_sparse(blocks, "dense")
        dense = decode_rate(model, prompt, args.new_tokens, args.repeats)
        dense_rates.append(dense)
        configure_sparse(blocks, method, **options)
        rate = decode_rate(model, prompt, args.new_tokens, args.repeats)
        stats = SparseStats()
        configure_sparse(blocks, method, stats=stats, **options)
        model.generate_greedy(prompt, args.new_tokens, backend="cpu")
        summary = stats.summary()
        kept = mean_kept(summary)
        reached = ", ".join(f"{name} {value:.3f}" for name, value in sorted(kept.items()))
        note = f"kept reached ({summary.get('tokens')} tokens incl. the prompt): {reached}; MLP bytes " \
               f"{summary.get('bytes_relative', float('nan')):.3f} of dense"
        if method == "predicted":
            note += f"; random predictors, rank {rank}"
        if method == "wina":
            note += "; masks in torch ops (no kernel)"
        note += extra_note
        log(f"{method} {label}: {rate:.1f} tok/s ({rate / dense:.2f}x dense at {dense:.1f}); {note}")
        return dict(benchmark="training_free", case=case, measure=f"{method} decode, {label}",
                    value=rate, unit="tok/s", baseline="dense decode (timed right before)",
                    baseline_value=dense, ratio=rate / dense, note=note)

    rows, dense_rates = [], []
    for method in METHODS:
        for keep in KEEPS:
            options = dict(mlp_keep=keep, sparse_attention=False)
            if method in thresholds:
                options["thresholds"] = thresholds[method][keep]
            if method == "predicted":
                options["predictors"] = predictors
            rows.append(timed_row(method, options, f"MLP keep {keep}"))
    for path in args.allocation:
        method, options = allocation_options(path, model, inputs, predictors)
        rows.append(timed_row(method, options, f"MLP keep per layer from {os.path.basename(path)}",
                              f"; per-layer kept fractions of {path}"))
    configure_sparse(blocks, "dense")
    rows.insert(0, dict(benchmark="training_free", case=case, measure="dense decode", value=statistics.median(
        dense_rates), unit="tok/s", note=f"median of {len(dense_rates)} runs, one before each method's"))
    print(format_table(rows))
    write_json({"benchmark": "training_free", "threads": args.threads, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(), "predictor_rank": rank,
                "calibration_tokens": args.calibration_tokens, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)  # DEJAVU_CPU_KERNELS, DEJAVU_HUGE_PAGES, ...: read at the command's edge
    sys.exit(main())
