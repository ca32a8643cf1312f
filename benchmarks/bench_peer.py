"""Decode speed of the engine next to llama.cpp, the peer a CPU user would pick, on the same weights.

The embedded SmolLM2-135M-Instruct GGUF (Q4_1) is de-quantized and written as F32, F16 and BF16
GGUF files (gguf_precision.py, cached in --gguf-dir), which llama.cpp runs through
llama-cpp-python; the engine runs the converted checkpoint with its weights in float32, bfloat16
and float16, and the predicted-sparse MLP in bfloat16 (random predictors, speed only; their weights
rounded to bfloat16 too unless --sparse-predictor-dtype says otherwise). Same
prompt token ids, same thread count, batch 1, greedy.

Method, identical for every run: time producing 1 new token (the prompt phase) and 1 + N new
tokens, --samples times each, alternating; decode = N / (the difference of their medians).
--repeats rounds, each timing every run in turn, so a
change in the machine's state hits all of them; rates are medians over rounds, ratios medians of
the per-round ratios. The memory bound of each precision: its weight bytes per token / the copy
rate measured at the start of each round (bench_memory.copy_bandwidth).

    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" .venv/bin/pip install -r requirements-peer.txt
    .venv/bin/python benchmarks/bench_peer.py --threads 2

--shape llama-3.2-3b (shaped_gguf.py) runs both sides instead on a random-weight model of that
Llama's widths with SmolLM2's vocabulary (--shape-layers of them; written once as F16 GGUF in
--gguf-dir, converted once into pretrained_models/): speed at the rows' usual width, where a kept
neuron is a longer run of memory. --engine-dtypes and --peer-types choose the runs (a 3B-wide
model in every precision at once needs more memory than the embedded one).

Targets (batch 1): engine bfloat16 >= 1.0x llama.cpp F16; engine float32 >= 1.0x llama.cpp F32;
predicted-sparse MLP at keep 0.5 in bfloat16 >= 1.2x llama.cpp F16.
Without llama-cpp-python it says so and exits with status 2. Writes JSON (default
benchmarks/results/bench_peer.json) and prints the table.
"""

import argparse
import os
import platform
import statistics
import sys
import time

from support import (DEFAULT_CHECKPOINT, ROOT, embedded_model, ensure_checkpoint, format_table, matched_rank,
                     result_path, write_json)

TARGETS = {  # (run, peer run): at least
    ("engine bfloat16", "llama.cpp F16"): 1.0,
    ("engine float32", "llama.cpp F32"): 1.0,
    ("sparse bfloat16 keep 0.5", "llama.cpp F16"): 1.2,
}
INSTALL = ("llama-cpp-python is not installed: pip install -r requirements-peer.txt (it compiles llama.cpp, "
           "about 13 minutes on 2 cores)")


class PeerError(RuntimeError):
    pass


def load_llama_cpp(path, threads, context):
    """llama.cpp's model of a GGUF file; PeerError naming the file where it refuses it."""
    from llama_cpp import Llama

    try:
        return Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context, n_batch=512,
                     verbose=False)
    except Exception as error:  # llama-cpp-python raises ValueError (and others) on a file it cannot load
        raise PeerError(f"llama.cpp refused {path}: {error}") from None


def llama_cpp_run(model, prompt):
    """run(new) -> the new tokens, greedy, after a fresh prompt."""
    def run(new):
        tokens = []
        for token in model.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == new:
                return tokens
        return tokens
    return run


def gguf_files(folder, types, source=None, stem=None):
    """{type: path} of the GGUF `source` (default: the embedded one) written at each type as
    folder/stem.type.gguf (stem default: the source's name; written once, then reused)."""
    from dejavu_llama.gguf_precision import write_gguf

    source = source or os.path.join(*embedded_model())
    stem = stem or os.path.splitext(os.path.basename(source))[0]
    os.makedirs(folder, exist_ok=True)
    found = {}
    for gguf_type in types:
        path = os.path.join(folder, f"{stem}.{gguf_type}.gguf")
        if not os.path.isfile(path):
            write_gguf(source, path, gguf_type)
        found[gguf_type] = path
    return found


def shaped_model(shape, layers, gguf_dir, log=print):
    """(name, checkpoint folder, F16 GGUF path) of the random model of `shape` (shaped_gguf.py),
    each written once and reused."""
    from shaped_gguf import shape_of, shaped_name, write_shaped_gguf

    layers = shape_of(shape, layers)["layers"]
    name = shaped_name(shape, layers)
    os.makedirs(gguf_dir, exist_ok=True)
    path = os.path.join(gguf_dir, f"{name}.f16.gguf")
    if not os.path.isfile(path):
        log(f"writing {path}")
        write_shaped_gguf(os.path.join(*embedded_model()), path, shape, layers)
    checkpoint = ensure_checkpoint(os.path.join(ROOT, "pretrained_models", name), log,
                                   gguf=(gguf_dir, os.path.basename(path)))
    return name, checkpoint, path



def timed(fn, clock=time.perf_counter):
    start = clock()
    result = fn()
    return clock() - start, result


def decode_seconds(run, new_tokens, samples, clock=time.perf_counter):
    """(seconds to decode new_tokens, the tokens produced): run(1) (the prompt phase) and
    run(1 + new_tokens) timed `samples` times each, alternating, the difference of their medians
    (so one slow prompt phase, in either, does not pass for decode time)."""
    prompt_times, full_times = [], []
    for _ in range(samples):
        prompt_times.append(timed(lambda: run(1), clock)[0])
        full_time, produced = timed(lambda: run(1 + new_tokens), clock)
        full_times.append(full_time)
    return max(statistics.median(full_times) - statistics.median(prompt_times), 1e-9), produced


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help=f"the engine's checkpoint (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--shape", default=None,
                        help="a random-weight model of this Llama's widths instead (shaped_gguf.SHAPES: "
                             "llama-3.2-1b, llama-3.2-3b)")
    parser.add_argument("--shape-layers", type=int, default=None, help="its layers (default: the model's own)")
    parser.add_argument("--engine-dtypes", nargs="+", choices=("float32", "bfloat16", "float16"),
                        default=["float32", "bfloat16", "float16"], help="the engine's dense runs")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=3,
                        help="timings of the prompt phase and of the whole run per round, their medians subtracted "
                             "(the engine's float16 prompt phase runs torch's slow float16 CPU matmuls: one "
                             "sample each let its noise pass for decode time)")
    parser.add_argument("--peer-types", nargs="+", choices=("f32", "f16", "bf16"), default=["f32", "f16"],
                        help="llama.cpp's GGUF types (bf16 where the build runs it)")
    parser.add_argument("--sparse-keeps", type=float, nargs="*", default=[0.5],
                        help="the predicted-sparse MLP's kept fractions in bfloat16 (none: skip)")
    parser.add_argument("--sparse-D", type=int, default=None,
                        help="the random predictors' width (default: upstream's share of the MLP's bytes, "
                             "64 for SmolLM2, 341 at Llama-3.2-3B's widths)")
    parser.add_argument("--sparse-predictor-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="the sparse runs' predictor weights (default: the model's bfloat16, half precision "
                             "end to end)")
    parser.add_argument("--gguf-dir", default=os.path.join(ROOT, "pretrained_models", "gguf"))
    parser.add_argument("--output", default=result_path("peer"))
    args = parser.parse_args(argv)
    if args.shape and args.checkpoint:
        parser.error("--shape and --checkpoint: give one (--shape makes its own checkpoint)")
    try:
        import llama_cpp
    except ImportError:
        print(f"bench_peer: {INSTALL}", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer

    from bench_engine import engine_of, make_prompts, sparse_runs
    from bench_memory import copy_bandwidth, decode_bytes
    from dejavu_llama.modules import cpu_kernels
    from dejavu_llama.modules.local_model import LocalModel

    torch.set_num_threads(args.threads)
    cpu_kernels.set_num_threads(args.threads)
    source, stem, model_name = None, None, "SmolLM2-135M-Instruct"
    if args.shape:
        from shaped_gguf import ShapeError

        try:
            model_name, checkpoint, source = shaped_model(args.shape, args.shape_layers, args.gguf_dir)
            stem = model_name  # its F16 file is stem.f16.gguf, the f16 run's own
        except ShapeError as error:
            parser.error(str(error))
    else:
        checkpoint = ensure_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = make_prompts(tokenizer, 1, args.prompt_tokens)
    settings = [{"temperature": 0.0, "top_p": 1.0, "top_k": 0, "logprobs": None, "echo": False}]
    args.batch = 1

    runs, token_bytes = [], {}
    config = None
    for dtype in dict.fromkeys(args.engine_dtypes):
        model = LocalModel.from_checkpoint(checkpoint, "llama", dtype=getattr(torch, dtype))
        engine = engine_of(model, args, dtype)
        token_bytes[f"engine {dtype}"], config = decode_bytes(model)[0], model.config
        runs.append((f"engine {dtype}", lambda new, engine=engine: [
            row["generated"] for row in engine.inference_batch(prompts, new, settings)][0]))
    if args.sparse_keeps:
        if args.sparse_D is None:
            args.sparse_D = matched_rank(config.hidden_size, config.intermediate_size)
        args.sparse_predictor_dtypes = [args.sparse_predictor_dtype]
        for name, run in sparse_runs(checkpoint, prompts, settings, args, "bfloat16"):
            keep = name.split("keep ")[1].split(" ")[0]
            runs.append((f"sparse bfloat16 keep {keep}", run))
    context = args.prompt_tokens + args.new_tokens + 8
    for gguf_type, path in gguf_files(args.gguf_dir, args.peer_types, source, stem).items():
        try:
            model = load_llama_cpp(path, args.threads, context)
        except PeerError as error:
            print(f"bench_peer: {error}", file=sys.stderr)
            return 1
        runs.append((f"llama.cpp {gguf_type.upper()}", llama_cpp_run(model, prompts[0])))
    for _, run in runs:
        run(2)  # warm-up

    samples = {name: [] for name, _ in runs}
    tokens = {}
    bandwidths = []
    for _ in range(args.repeats):
        bandwidths.append(copy_bandwidth(256, 5))
        for name, run in runs:
            seconds, produced = decode_seconds(run, args.new_tokens, args.samples)
            samples[name].append(seconds)
            tokens[name] = list(produced)

    def ratio(name, baseline):
        return statistics.median(b / a for a, b in zip(samples[name], samples[baseline]))

    rates = {name: args.new_tokens / statistics.median(times) for name, times in samples.items()}
    bound_fractions = {name: statistics.median(args.new_tokens / t / (rate * 1e9 / token_bytes[name])
                                               for t, rate in zip(samples[name], bandwidths))
                       for name in token_bytes}
    report = {
        "model": model_name, "sparse_D": args.sparse_D if args.sparse_keeps else None, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "threads": args.threads, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "torch": torch.__version__, "weight_paths": cpu_kernels.kernel_library().dejavu_weight_paths(),
        "decode_tokens_per_s": rates, "copy_bandwidths_gbps": bandwidths, "bound_fractions": bound_fractions,
        f"same_tokens_as_{runs[0][0].replace(' ', '_')}": {name: tokens[name] == tokens[runs[0][0]] for name in tokens},
    }
    rows = []
    case = f"{report['model']}, batch 1, prompt {args.prompt_tokens}, {args.new_tokens} new, {args.threads} thread(s)"
    peers = [name for name in rates if name.startswith("llama.cpp")]
    for name in rates:
        if name.startswith("llama.cpp"):
            continue
        for peer in peers:
            target = TARGETS.get((name, peer))
            row = dict(benchmark="peer", case=case, measure=f"{name} decode", value=rates[name], unit="tok/s",
                       baseline=peer, baseline_value=rates[peer], ratio=ratio(name, peer))
            if target is not None:
                row.update(target=f">= {target}", met=row["ratio"] >= target)
            rows.append(row)
        if name in bound_fractions:
            rows.append(dict(benchmark="peer", case=case, measure=f"{name} decode vs its memory bound",
                             value=bound_fractions[name], unit="fraction",
                             note=f"{token_bytes[name] / 1e6:.0f} MB/token"))
    report["rows"] = rows
    write_json(report, args.output)
    for name, rate in rates.items():
        print(f"{name:28s} decode {rate:8.1f} tok/s")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)
    sys.exit(main())
