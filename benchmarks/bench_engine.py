"""Prompt and decode throughput of the one-stage pipeline engine next to transformers.

Same model (SmolLM2-135M-Instruct: our converted checkpoint and transformers' model loaded
from the same GGUF), same inputs (real English text, every row cut to the same prompt length,
so neither side pads), same thread count, greedy decoding, float32. The engine also runs with
its weights in bfloat16 and float16 (--half-dtypes: the C kernels read them as they are, with
float32 activations), against its float32 run and its own memory bound.

Method, identical for both sides: time a run that produces 1 new token (= the prompt phase)
and a run that produces 1 + N new tokens; decode time = the difference. --repeats rounds, each
timing every run once in turn (engine, transformers, the sparse runs), so that a change in the
machine's state hits all of them; rates are medians over rounds, ratios medians of the
per-round ratios.
--threads sets torch's threads (both sides) and the C decode kernels' (cpu_kernels).

The memory bound of dense decoding at that thread count, measured in the same run: weight
bytes one token reads (every block, the LM head, one embedding row) / the copy bandwidth of
dst.copy_(src) with torch at --threads threads (bench_memory.copy_bandwidth: read + write
bytes, best of plain and huge-page tensors), measured at the start of every round: the
fraction of the bound is the median over rounds of that round's engine decode over that
round's bound (best-of-10 rates before and after the runs are reported beside it).

    .venv/bin/python benchmarks/bench_engine.py [--batch 1 --prompt-tokens 128 --new-tokens 32]

Targets (batch 1): decode >= 1.5x transformers; decode >= 0.7 of the memory bound; bfloat16 decode
>= 1.7x float32 and >= 0.8 of its memory bound (half the weight bytes); the predicted-sparse MLP
at keep 0.5 in bfloat16 >= 1.3x dense bfloat16.

Converts the checkpoint into $ROOT/pretrained_models/smollm2-135m-instruct if it is missing.
Writes JSON (default benchmarks/results/bench_engine.json) and prints the ratios.
"""

import argparse
import os
import platform
import statistics
import time

from support import DEFAULT_CHECKPOINT, embedded_model, ensure_checkpoint, format_table, result_path, write_json

TARGET_VS_TRANSFORMERS = 1.5  # decode, batch 1
TARGET_BOUND_FRACTION = 0.7  # decode, batch 1, of the memory bound at the threads used
TARGET_HALF_VS_FLOAT32 = 1.7  # bfloat16 decode against float32, batch 1
TARGET_HALF_BOUND_FRACTION = 0.8  # bfloat16 decode, of its own memory bound
TARGET_SPARSE_HALF = 1.3  # predicted-sparse MLP at keep 0.5 in bfloat16, against dense bfloat16

def make_prompts(tokenizer, batch, length):
    from dejavu_llama.task_datasets.offline_text import offline_documents

    prompts = []
    for passage in offline_documents():
        ids = tokenizer(passage.text)["input_ids"]
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == batch:
            return prompts
    raise SystemExit(f"not enough offline documents of {length} tokens")


def engine_of(model, args, dtype):
    import torch

    from dejavu_llama.comm.comm_utils import LocalCommunicator
    from dejavu_llama.pipeline_parallel.dist_pipeline_inference_mask_greedy_token_pipe_sync import DistInferenceMaskTokenPipeSync

    return DistInferenceMaskTokenPipeSync(LocalCommunicator(), 0, 1, model.embeddings, model.blocks, model.head,
                                          model.config.hidden_size, "cpu", getattr(torch, dtype),
                                          micro_batch_size=args.batch)


def sparse_runs(checkpoint, prompts, settings, args, model_dtype="float32"):
    """(name, run) per predictor dtype and kept fraction: the same engine on llama-ml-att-sparse
    blocks whose MLP is predicted (random predictors of width --sparse-D: speed only, the
    tokens mean nothing), with the predictors in float32 and rounded to float16, the model's
    weights in model_dtype."""
    import copy

    import torch
    from torch import nn

    from dejavu_llama.modules.local_model import LocalModel
    from dejavu_llama.modules.sparse_execution import configure_sparse
    from dejavu_llama.modules.decode.sparse_gather import round_predictor

    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse", dtype=getattr(torch, model_dtype))
    config = model.config
    generator = torch.Generator().manual_seed(0)
    predictors = {}
    for layer in range(config.num_hidden_layers):
        predictor = nn.Sequential(nn.Linear(config.hidden_size, args.sparse_D, bias=False),
                                  nn.Linear(args.sparse_D, config.intermediate_size, bias=False)).requires_grad_(False)
        for linear in predictor:
            linear.weight.normal_(0.0, linear.in_features ** -0.5, generator=generator)
        predictors["mlp", layer] = (predictor, "same")
    configure_sparse(list(model.blocks), "predicted", predictors=predictors, sparse_attention=False)
    engine = engine_of(model, args, model_dtype)
    sets = {"float32": [predictors["mlp", layer][0] for layer in range(config.num_hidden_layers)]}
    for rounded in [dtype for dtype in dict.fromkeys(args.sparse_predictor_dtypes) if dtype != "float32"]:
        sets[rounded] = [copy.deepcopy(predictor) for predictor in sets["float32"]]
        for predictor in sets[rounded]:
            round_predictor(predictor, getattr(torch, rounded))  # as configure_sparse(..., predictor_dtype=...) does
    runs, plans = [], {}
    for dtype in args.sparse_predictor_dtypes:
        for keep in args.sparse_keeps:
            def run(new, keep=keep, chosen=sets[dtype], key=(dtype, keep),
                    rounded=None if dtype == "float32" else getattr(torch, dtype)):
                for block, predictor in zip(model.blocks, chosen):
                    block.mlp.predictor, block.mlp.keep, block.mlp.predictor_rounded = predictor, keep, rounded
                if key not in plans:  # one plan per set-up, as a run makes it once
                    engine.prepare()
                    plans[key] = engine.plan
                engine.use_plan(plans[key])
                return engine.inference_batch(prompts, new, settings)
            suffix = "" if dtype == "float32" else f", {dtype}"
            prefix = "sparse" if model_dtype == "float32" else f"sparse {model_dtype}"
            runs.append((f"{prefix} MLP keep {keep} (D={args.sparse_D}{suffix})", run))
    return runs


def timed(fn, repeats):
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparse-keeps", type=float, nargs="*", default=[0.5, 0.25],
                        help="also time decoding with the MLP predicted-sparse at these kept fractions (none: skip)")
    parser.add_argument("--sparse-D", type=int, default=64,
                        help="predictor width of those runs (64: upstream's share of SmolLM2's MLP)")
    parser.add_argument("--sparse-predictor-dtypes", nargs="+", choices=("float32", "float16", "bfloat16"),
                        default=["float32", "float16"], help="predictor weights of those runs")
    parser.add_argument("--half-dtypes", nargs="*", choices=("bfloat16", "float16"), default=["bfloat16", "float16"],
                        help="also time the engine with its weights in these dtypes (none: skip)")
    parser.add_argument("--sparse-model-dtypes", nargs="+", choices=("float32", "bfloat16", "float16"),
                        default=["float32", "bfloat16"], help="the model's weights in the sparse runs")
    parser.add_argument("--output", default=result_path("engine"))
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dejavu_llama.comm.comm_utils import LocalCommunicator
    from dejavu_llama.modules.local_model import LocalModel
    from dejavu_llama.pipeline_parallel.dist_pipeline_inference_mask_greedy_token_pipe_sync import DistInferenceMaskTokenPipeSync

    from bench_memory import copy_bandwidth, decode_bytes
    from dejavu_llama.modules import cpu_kernels

    torch.set_num_threads(args.threads)
    cpu_kernels.set_num_threads(args.threads)
    bandwidths = [copy_bandwidth(256, 10)]  # GB/s at args.threads threads
    checkpoint = ensure_checkpoint(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = make_prompts(tokenizer, args.batch, args.prompt_tokens)

    ours = LocalModel.from_checkpoint(checkpoint, "llama", dtype=torch.float32)
    engine = DistInferenceMaskTokenPipeSync(
        LocalCommunicator(), 0, 1, ours.embeddings, ours.blocks, ours.head, ours.config.hidden_size, "cpu",
        torch.float32, micro_batch_size=args.batch,
    )
    token_bytes = decode_bytes(ours)[0]
    settings = [{"temperature": 0.0, "top_p": 1.0, "top_k": 0, "logprobs": None, "echo": False}] * args.batch

    def engine_run(new):
        return engine.inference_batch(prompts, new, settings)

    folder, gguf_file = embedded_model()
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)

    def hf_run(new):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0, eos_token_id=None)

    runs = [("engine", engine_run), ("transformers", hf_run)]
    half_bytes = {}
    for dtype in args.half_dtypes:
        half_model = LocalModel.from_checkpoint(checkpoint, "llama", dtype=getattr(torch, dtype))
        half_engine = engine_of(half_model, args, dtype)
        half_bytes[f"engine {dtype}"] = decode_bytes(half_model)[0]
        runs.append((f"engine {dtype}", lambda new, engine=half_engine: engine.inference_batch(prompts, new, settings)))
    if args.sparse_keeps:
        for dtype in args.sparse_model_dtypes:
            runs += sparse_runs(checkpoint, prompts, settings, args, dtype)
    for _, run in runs:
        run(2)  # warm-up
    # Round-robin: each round times every run once (its prompt alone, then prompt + N tokens), so
    # a change in the machine's state during the benchmark hits all of them alike; the ratios are
    # medians of per-round ratios.
    samples = {name: [] for name, _ in runs}
    round_bandwidths = []  # GB/s, measured in each round right before its runs
    for _ in range(args.repeats):
        round_bandwidths.append(copy_bandwidth(256, 5))
        for name, run in runs:
            prompt_time, _ = timed(lambda: run(1), 1)
            full_time, result = timed(lambda: run(1 + args.new_tokens), 1)
            samples[name].append((prompt_time, max(full_time - prompt_time, 1e-9)))
            if name == "engine":
                engine_tokens = [row["generated"] for row in result]
            elif name == "transformers":
                hf_tokens = result[:, ids.shape[1]:].tolist()
    figures = {}
    for name, rounds in samples.items():
        prompt_time = statistics.median(p for p, _ in rounds)
        decode_time = statistics.median(d for _, d in rounds)
        figures[name] = {
            "prompt_seconds": prompt_time, "decode_seconds": decode_time,
            "prompt_tokens_per_s": args.batch * args.prompt_tokens / prompt_time,
            "decode_tokens_per_s": args.batch * args.new_tokens / decode_time,
        }

    def round_ratio(name, baseline, phase):
        """Median over rounds of name's rate / baseline's rate in the same round."""
        index = 0 if phase == "prompt" else 1
        return statistics.median(b[index] / a[index] for a, b in zip(samples[name], samples[baseline]))

    bandwidths.append(copy_bandwidth(256, 10))
    # The bound of each round from the copy rate measured at its start, so that load on the
    # machine during the benchmark lowers a round's bound and its decode alike; the median.
    round_bounds = [rate * 1e9 / token_bytes for rate in round_bandwidths]  # tok/s at batch 1
    round_fractions = [args.batch * args.new_tokens / decode / bound
                       for (_, decode), bound in zip(samples["engine"], round_bounds)]
    bandwidth = statistics.median(round_bandwidths)
    bound = statistics.median(round_bounds)
    report = {
        "model": "SmolLM2-135M-Instruct (float32)", "checkpoint": checkpoint, "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
        "repeats": args.repeats, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "kernel_threads": cpu_kernels.num_threads(),
        "kernels": cpu_kernels.kernel_library() is not None, **figures,
        "copy_bandwidths_gbps": bandwidths, "copy_bandwidth_gbps": bandwidth, "bytes_per_token": token_bytes,
        "memory_bound_tokens_per_s": bound,
        "bound_fraction_decode": statistics.median(round_fractions),
        "round_copy_bandwidths_gbps": round_bandwidths, "round_bound_fractions": round_fractions,
        "ratio_prompt": round_ratio("engine", "transformers", "prompt"),
        "ratio_decode": round_ratio("engine", "transformers", "decode"),
        "same_greedy_tokens": engine_tokens == hf_tokens,
        "sparse_decode_vs_engine": {name: round_ratio(name, "engine", "decode")
                                    for name in figures if name.startswith("sparse MLP")},
        "half": {name: {"decode_vs_float32": round_ratio(name, "engine", "decode"),
                        "bytes_per_token": half_bytes[name],
                        "bound_fraction_decode": statistics.median(
                            args.batch * args.new_tokens / decode / (rate * 1e9 / half_bytes[name])
                            for (_, decode), rate in zip(samples[name], round_bandwidths)),
                        "sparse_vs_dense": {other: round_ratio(other, name, "decode") for other in figures
                                            if other.startswith(f"sparse {name.split()[-1]} ")}}
                 for name in half_bytes},
    }
    report["rows"] = table_rows(report, figures)
    write_json(report, args.output)
    for name, f in figures.items():
        print(f"{name:28s} prompt {f['prompt_tokens_per_s']:9.1f} tok/s   decode {f['decode_tokens_per_s']:8.1f} tok/s")
    print(f"engine / transformers: prompt x{report['ratio_prompt']:.2f}, decode x{report['ratio_decode']:.2f}; "
          f"same greedy tokens: {report['same_greedy_tokens']}")
    for name, ratio in report["sparse_decode_vs_engine"].items():
        print(f"{name} / dense engine: decode x{ratio:.2f}")
    print(f"memory bound at {args.threads} thread(s): {bound:.1f} tok/s (copy {bandwidth:.1f} GB/s, "
          f"{token_bytes / 1e6:.0f} MB/token); engine decode at {report['bound_fraction_decode']:.2f} of it")
    for name, half in report["half"].items():
        print(f"{name} / float32: decode x{half['decode_vs_float32']:.2f}; at {half['bound_fraction_decode']:.2f} of "
              f"its memory bound ({half['bytes_per_token'] / 1e6:.0f} MB/token)")
        for other, ratio in half["sparse_vs_dense"].items():
            print(f"{other} / {name}: decode x{ratio:.2f}")
    print(format_table(report["rows"]))


def table_rows(report, figures):
    """run_all.py's table rows (with the targets)."""
    threads, batch = report["threads"], report["batch"]
    case = f"{report['model']}, batch {batch}, prompt {report['prompt_tokens']}, {report['new_tokens']} new, " \
           f"{threads} thread(s)"
    engine, hf = figures["engine"], figures["transformers"]
    rows = []
    for phase in ("decode", "prompt"):
        rows.append(dict(benchmark="engine", case=case, measure=f"engine {phase}", value=engine[f"{phase}_tokens_per_s"],
                         unit="tok/s", baseline="transformers", baseline_value=hf[f"{phase}_tokens_per_s"],
                         ratio=report[f"ratio_{phase}"]))
    rows[0]["note"] = f"same greedy tokens as transformers: {report['same_greedy_tokens']}; " \
                      f"C kernels at {report['kernel_threads']} thread(s)"
    bandwidths = ", ".join(f"{b:.1f}" for b in report["copy_bandwidths_gbps"])
    rows.append(dict(benchmark="engine", case=f"copy bandwidth, {threads} thread(s)",
                     measure="dst.copy_(src), 256 MB, best of 5 per round, median", value=report["copy_bandwidth_gbps"],
                     unit="GB/s", note=f"best of 10 before / after the decode runs: {bandwidths} GB/s"))
    rows.append(dict(benchmark="engine", case=case, measure="engine decode vs memory bound",
                     value=engine["decode_tokens_per_s"], unit="tok/s",
                     baseline=f"bound at {threads} thread(s)", baseline_value=report["memory_bound_tokens_per_s"],
                     ratio=report["bound_fraction_decode"],
                     note=f"bound = {report['bytes_per_token'] / 1e6:.0f} MB/token / the copy rate of each round; "
                          f"median of the rounds' decode / bound"))
    if batch == 1:
        rows[0].update(target=f">= {TARGET_VS_TRANSFORMERS}", met=rows[0]["ratio"] >= TARGET_VS_TRANSFORMERS)
        rows[-1].update(target=f">= {TARGET_BOUND_FRACTION}", met=rows[-1]["ratio"] >= TARGET_BOUND_FRACTION)
    for name, ratio in report["sparse_decode_vs_engine"].items():
        rows.append(dict(benchmark="engine", case=case, measure=f"{name} decode", unit="tok/s",
                         value=figures[name]["decode_tokens_per_s"], baseline="engine decode",
                         baseline_value=engine["decode_tokens_per_s"], ratio=ratio,
                         note="random predictors: speed only, the tokens mean nothing"))
    for name, half in report["half"].items():
        bf16 = name.endswith("bfloat16") and batch == 1
        row = dict(benchmark="engine", case=case, measure=f"{name} decode", unit="tok/s",
                   value=figures[name]["decode_tokens_per_s"], baseline="engine float32 decode",
                   baseline_value=engine["decode_tokens_per_s"], ratio=half["decode_vs_float32"])
        if bf16:
            row.update(target=f">= {TARGET_HALF_VS_FLOAT32}", met=row["ratio"] >= TARGET_HALF_VS_FLOAT32)
        rows.append(row)
        row = dict(benchmark="engine", case=case, measure=f"{name} decode vs its memory bound", unit="fraction",
                   value=half["bound_fraction_decode"], note=f"{half['bytes_per_token'] / 1e6:.0f} MB/token")
        if bf16:
            row.update(ratio=half["bound_fraction_decode"], target=f">= {TARGET_HALF_BOUND_FRACTION}",
                       met=half["bound_fraction_decode"] >= TARGET_HALF_BOUND_FRACTION)
        rows.append(row)
        for other, ratio in half["sparse_vs_dense"].items():
            row = dict(benchmark="engine", case=case, measure=f"{other} decode", unit="tok/s",
                       value=figures[other]["decode_tokens_per_s"], baseline=f"{name} decode",
                       baseline_value=figures[name]["decode_tokens_per_s"], ratio=ratio,
                       note="random predictors: speed only")
            if bf16 and "keep 0.5 " in other:
                row.update(target=f">= {TARGET_SPARSE_HALF}", met=ratio >= TARGET_SPARSE_HALF)
            rows.append(row)
    return rows


if __name__ == "__main__":
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)  # DEJAVU_CPU_KERNELS, DEJAVU_HUGE_PAGES, ...: read at the command's edge
    main()
