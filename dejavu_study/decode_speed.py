"""Decode speed of a run's sparse configurations against dense: the time axis of the frontier.

    python -m dejavu_study.decode_speed RUN [--threads 2] [--rounds 3] [--new-tokens 32] [--prompt-tokens 64]
                                            [--kinds kernel bound masks] [--max-perplexity-change PCT]

Every perplexity run of the study saves its SparseConfig beside its results
(RUN/results_*.jsonl.sparse_config.json). This times each configuration of the MLP made sparse
alone, as the perplexity runs ran it, on the run's checkpoint (study.json), through the cpu
backend (the C decode kernels) at --threads threads: greedy decoding of --new-tokens tokens after
a prompt of the first --prompt-tokens tokens of the first validation request, timed from the token
the prompt gives to the last (each step stamped as its token is chosen). A sparse model and a
dense one are loaded once; each configuration is set up once and then timed in --rounds rounds,
each round the dense model right before it, so load on the machine hits the pair alike. A
configuration's figure is the median over rounds of its rate over that round's dense rate.

A mode that chooses from the dense activation (oracle) is marked a bound: its speed is not
realisable. A mode with no kernel of its own (wina) runs masks in torch ops, marked so.

Writes RUN/decode_speed.json (atomically), read by the report (dejavu_study.report).
"""

import argparse
import glob
import json
import logging
import os
import platform
import statistics
import sys
import time

from dejavu_common.helpers import write_json_atomic

log = logging.getLogger("dejavu_study.decode_speed")

CONFIG_SUFFIX = ".sparse_config.json"
OUTPUT_FILE = "decode_speed.json"
FORMAT, VERSION = "dejavu-decode-speed", 1


KINDS = ("kernel", "bound", "masks")


class DecodeSpeedError(RuntimeError):
    pass


def mlp_configs(run_dir):
    """[(results file, SparseConfig)] of the run's MLP-only sparse runs, in file name order."""
    from dejavu_llama.modules.sparse_config import SparseConfig, SparseConfigError

    found = []
    for path in sorted(glob.glob(os.path.join(run_dir, "results_*.jsonl" + CONFIG_SUFFIX))):
        try:
            config = SparseConfig.load(path)
        except SparseConfigError as error:
            raise DecodeSpeedError(str(error)) from None
        if config.sparse_mlp and not config.sparse_attention and config.mode != "dense":
            found.append((path[: -len(CONFIG_SUFFIX)], config))
    return found


def within_budget(run_dir, configs, max_change_pct):
    """The configs whose perplexity (RUN/perplexity.jsonl, the study's log, read as the report
    reads it) is at most max_change_pct percent over dense: the only ones a budget up to it can choose."""
    from dejavu_study.report.runs import read_perplexity

    log_ = read_perplexity(run_dir)
    if log_["dense"] is None or not log_["dense"]["perplexity"]:
        raise DecodeSpeedError(f"{log_['path']}: no dense perplexity to measure a budget from")
    change = {os.path.abspath(e["result_file"]): e.get("increase_pct") for e in log_["entries"] if e.get("result_file")}
    return [(results, config) for results, config in configs
            if change.get(os.path.abspath(results)) is not None and change[os.path.abspath(results)] <= max_change_pct]


def kind_of(mode):
    """'kernel' (realisable through its kernels), 'bound' (not realisable) or 'masks' (no kernel)."""
    if not mode.realisable:
        return "bound"
    return "kernel" if mode.decodes_in_kernels() else "masks"


def prompt_ids(run_dir, checkpoint, count):
    from transformers import AutoTokenizer

    path = os.path.join(run_dir, "c4_val.jsonl")
    try:
        with open(path, encoding="utf-8") as handle:
            first = json.loads(next(line for line in handle if line.strip()))
    except (OSError, StopIteration, ValueError) as error:
        raise DecodeSpeedError(f"{path}: no validation request to take a prompt from ({error})") from None
    ids = AutoTokenizer.from_pretrained(checkpoint)(first["prompt"], add_special_tokens=False)["input_ids"]
    if len(ids) < count:
        raise DecodeSpeedError(f"{path}: the first request has {len(ids)} tokens; --prompt-tokens {count} asked")
    return ids[:count]


def timed_rate(model, prompt, new_tokens, warm=True):
    """Decoded tokens per second: 1 + new_tokens tokens are generated and each step is stamped as
    its token is chosen; the rate is new_tokens over the time from the first token (the prompt's)
    to the last, so the prompt's time never enters and no two runs' times are subtracted.
    warm: decode once untimed first (the first call after a set-up builds its kernel views)."""
    stamps = []

    def run():
        stamps.clear()
        model.generate_greedy(prompt, 1 + new_tokens, backend="cpu", on_token=lambda: stamps.append(time.perf_counter()))

    if warm:
        run()
    run()
    if len(stamps) != 1 + new_tokens or stamps[-1] <= stamps[0]:
        raise DecodeSpeedError(f"decoding {new_tokens} tokens gave {len(stamps)} step times spanning "
                               f"{stamps[-1] - stamps[0] if stamps else 0:.6f} s: nothing to time")
    return new_tokens / (stamps[-1] - stamps[0])


def measure(run_dir, threads, rounds, new_tokens, prompt_tokens, progress=True, kinds=None, max_change_pct=None):
    import torch
    from tqdm import tqdm

    from dejavu_llama.modules import cpu_kernels
    from dejavu_llama.modules.local_model import LocalModel
    from dejavu_llama.modules.sparse_execution import MODES, apply_sparse

    study_path = os.path.join(run_dir, "study.json")
    try:
        with open(study_path, encoding="utf-8") as handle:
            study = json.load(handle)
    except (OSError, ValueError) as error:
        raise DecodeSpeedError(f"{study_path}: cannot read the run's study.json ({error})") from None
    checkpoint, model_type = study.get("checkpoint"), study.get("model_type", "llama")
    if not checkpoint or not os.path.isdir(checkpoint):
        raise DecodeSpeedError(f"{study_path}: checkpoint {checkpoint!r} is not a folder")
    configs = mlp_configs(run_dir)
    if not configs:
        raise DecodeSpeedError(f"{run_dir}: no results_*.jsonl{CONFIG_SUFFIX} of an MLP-only sparse run")
    if kinds is not None:
        configs = [(results, config) for results, config in configs if kind_of(MODES[config.mode]) in kinds]
        if not configs:
            raise DecodeSpeedError(f"{run_dir}: no MLP-only sparse run of kind {', '.join(kinds)}")
    if max_change_pct is not None:
        configs = within_budget(run_dir, configs, max_change_pct)
        if not configs:
            raise DecodeSpeedError(f"{run_dir}: no MLP-only sparse run within +{max_change_pct:g}% perplexity of dense")
    torch.set_num_threads(threads)
    cpu_kernels.set_num_threads(threads)
    prompt = torch.tensor([prompt_ids(run_dir, checkpoint, prompt_tokens)])
    dense = LocalModel.from_checkpoint(checkpoint, model_type, backend="cpu")
    sparse = LocalModel.from_checkpoint(checkpoint, f"{model_type}-ml-att-sparse", backend="cpu")
    rows, dense_rates = [], []
    with torch.inference_mode():
        for results, config in tqdm(configs, desc="decode speed", unit="config", disable=not progress):
            apply_sparse(list(sparse.blocks), config.replace(stats_file=None))
            ratios, rates = [], []
            for round_index in range(rounds):
                dense_rate = timed_rate(dense, prompt, new_tokens, warm=not dense_rates)
                rate = timed_rate(sparse, prompt, new_tokens, warm=round_index == 0)
                dense_rates.append(dense_rate)
                rates.append(rate)
                ratios.append(rate / dense_rate)
            rows.append({"result_file": results, "mode": config.mode, "mlp_keep": config.mlp_keep,
                         "allocated": bool(config.layer_mlp_keep or config.mlp_keep_file), "kind": kind_of(MODES[config.mode]),
                         "rate": statistics.median(rates), "ratio": statistics.median(ratios), "ratios": ratios})
            log.info("%s: %.1f tok/s, %.3fx dense (%s)", os.path.basename(results), rows[-1]["rate"],
                     rows[-1]["ratio"], rows[-1]["kind"])
    return {"format": FORMAT, "version": VERSION, "checkpoint": checkpoint, "backend": "cpu", "threads": threads,
            "kernels": cpu_kernels.kernel_library() is not None, "rounds": rounds, "new_tokens": new_tokens,
            "prompt_tokens": prompt_tokens, "kinds": list(kinds or KINDS), "max_perplexity_change_pct": max_change_pct,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "dense_rate": statistics.median(dense_rates), "configs": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Decode speed of a run's sparse configurations against dense")
    parser.add_argument("run", help="a study run folder (scripts/demo.sh, scripts/frontier.sh)")
    parser.add_argument("--threads", type=int, default=2, help="threads of torch and of the C kernels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="time only configurations of these kinds (kernel: realisable through the kernels; "
                             "bound: oracle; masks: no kernel); the report marks the others unmeasured")
    parser.add_argument("--max-perplexity-change", type=float, default=None, metavar="PCT",
                        help="time only configurations within PCT percent of dense perplexity (RUN/perplexity.jsonl): "
                             "the only ones a budget up to PCT can choose; the report marks the others unmeasured")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[decode speed] %(levelname)s: %(message)s", stream=sys.stderr)
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)
    for flag, value in (("--threads", args.threads), ("--rounds", args.rounds), ("--new-tokens", args.new_tokens),
                        ("--prompt-tokens", args.prompt_tokens)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    try:
        figures = measure(args.run, args.threads, args.rounds, args.new_tokens, args.prompt_tokens,
                          kinds=tuple(args.kinds), max_change_pct=args.max_perplexity_change)
    except DecodeSpeedError as error:
        log.error("%s", error)
        return 1
    path = os.path.join(args.run, OUTPUT_FILE)
    write_json_atomic(path, figures, indent=2)
    log.info("wrote %s (dense %.1f tok/s at %d thread(s))", path, figures["dense_rate"], args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
