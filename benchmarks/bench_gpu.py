"""GPU decoding: the engine's cuda backend against transformers, dense and DejaVu-sparse.

    python benchmarks/bench_gpu.py [--dims 1b,3b] [--batches 1,16] [--new-tokens 64] [--json PATH]
    (or: python benchmarks/run_all.py --device cuda)

Random-weight Llamas at Llama-3.2-1B and 3B dims with SmolLM2's vocabulary (49152), float16,
built in memory: no hub, no checkpoint on disk. For each dims and batch, all in one process:
  - the engine (the pipeline's one-stage run: sampling, logprobs) with the cuda decode backend
    (static KV cache, one CUDA graph per decoding step) and with the eager torch backend;
  - transformers' `generate`, eager and with cache_implementation="static";
  - the memory bound: weight bytes read per token over the device's copy rate (bytes copied
    per second; as the project's GPU check defines it);
  - batch 1: DejaVu's predicted MLP at keep 0.5 / 0.25 / 0.1 against the dense engine, with
    random predictors at upstream's share of the MLP's weights (support.matched_rank), and the
    MLP at keep 0.5 with predicted heads at keep 0.5 (the kept heads' q rows and o columns);
  - one layer's MLP step by part, each part timed alone in CUDA-graph replays: the
    predictor, top-K, the sort, the selection as one Triton program (triton_sparse.top_k_indices:
    topk and sort in one launch, not yet in the decoding path), the two Triton gathers, against
    the dense MLP.
Decode tok/s = rows x N / (time of 1 + N new tokens - time of 1), the median of --repeats.
Without CUDA it runs the same steps at tiny dims on the CPU: a check of the script, not a speed
(the parts by layer too where TRITON_INTERPRET=1 runs the Triton kernels through the interpreter).
"""

import argparse
import os
import statistics
import sys
import time

import torch

from support import RESULTS, format_table, matched_rank, random_predictors, write_json

DIMS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
}
VOCAB = 49152
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
TARGETS = {"dense_vs_static": 1.0, "bound_fraction": 0.65, "keep_0.25": 1.5, "keep_0.5": 1.2}


def llama_config(dims):
    from transformers import LlamaConfig

    fields = dict(DIMS[dims], vocab_size=VOCAB, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    try:
        return LlamaConfig(**fields, rope_parameters=dict(ROPE))
    except TypeError:  # transformers 4: rope_theta and rope_scaling
        rope = dict(ROPE)
        return LlamaConfig(**fields, rope_theta=rope.pop("rope_theta"), rope_scaling=rope)


def random_engine_model(config, model_type, device, dtype, seed=0):
    """The project's LocalModel of `model_type` with random weights (std 0.02, as transformers'
    init), built on the device: speed only."""
    from dejavu_llama.modules.local_model import LocalModel
    from dejavu_llama.pipeline_parallel.model_registry import load_model_module

    parts = load_model_module(model_type)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LocalModel(parts.GPTEmbeddings(config),
                           [parts.GPTBlock(config, layer_index=i) for i in range(config.num_hidden_layers)],
                           parts.GPTLMHead(config))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def weight_bytes_per_token(model):
    """Bytes a decoding step reads: every block and the head (the embedding: one row, left out)."""
    return sum(p.numel() * p.element_size() for part in (model.blocks, model.head) for p in part.parameters())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rate(run, rows, new_tokens, device, repeats, attempts=5):
    """rows x N / (t(1 + N) - t(1)): the prompt and the first token cancel out. A difference that
    is not positive (load landed on the short runs; tiny dims in a dry run) is timed again, and
    after `attempts` refused: a rate from it would be meaningless."""
    for _ in range(attempts):
        elapsed = timed(lambda: run(1 + new_tokens), device, repeats) - timed(lambda: run(1), device, repeats)
        if elapsed > 0:
            return rows * new_tokens / elapsed
    raise RuntimeError(f"{attempts} timings of {new_tokens} new tokens were not longer than of 1: the device is "
                       "too busy to time decoding")


def copy_rate(nbytes, device, repeats):
    """Bytes copied per second by one device-to-device copy of `nbytes`."""
    source = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    target = torch.empty_like(source)
    return nbytes / timed(lambda: target.copy_(source), device, repeats)


def engine_runner(model, backend, device, dtype, prompts):
    from dejavu_llama.comm.comm_utils import LocalCommunicator
    from dejavu_llama.pipeline_parallel.dist_pipeline_inference_mask_greedy_token_pipe_sync import (
        DistInferenceMaskTokenPipeSync,
    )

    engine = DistInferenceMaskTokenPipeSync(LocalCommunicator(), 0, 1, model.embeddings, model.blocks, model.head,
                                            model.config.hidden_size, device, dtype, micro_batch_size=len(prompts),
                                            decode_backend=backend)
    settings = [{"temperature": 0.0, "top_p": 1.0, "top_k": 0, "logprobs": None, "echo": False}] * len(prompts)
    return lambda new_tokens: engine.inference_batch(prompts, new_tokens, settings)


def transformers_runner(hf_model, input_ids, **extra):
    def run(new_tokens):
        with torch.inference_mode():
            return hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                                     **extra)
    return run


def row(case, measure, value, unit="tok/s", **extra):
    return dict(benchmark="gpu", case=case, measure=measure, value=value, unit=unit, **extra)


def with_target(entry, key):
    target = TARGETS[key]
    entry.update(target=f">= {target}", met=entry["ratio"] >= target)
    return entry


def bench_dims(dims, batches, args, device, dtype, log):
    from transformers import LlamaForCausalLM

    config = llama_config(dims)
    rows = []
    dense = random_engine_model(config, "llama", device, dtype)
    nbytes = weight_bytes_per_token(dense)
    rate = copy_rate(nbytes, device, args.repeats)
    bound = rate / nbytes
    log(f"{dims}: {nbytes / 1e9:.2f} GB of weights per token, copy {rate / 1e12:.2f} TB/s -> bound {bound:.0f} tok/s")
    with torch.device(device):
        hf_model = LlamaForCausalLM(config)
    hf_model = hf_model.to(dtype).eval()
    prompt = torch.randint(3, VOCAB, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    for batch in batches:
        case = f"Llama-3.2-{dims.upper()} dims, random, {str(dtype)[6:]}, batch {batch}, prompt {args.prompt_tokens}, " \
               f"{args.new_tokens} new"
        prompts = [prompt] * batch
        input_ids = torch.tensor(prompts, device=device)
        figures = {}
        for name, run in (("engine cuda", engine_runner(dense, "cuda", device, dtype, prompts)),
                          ("engine torch", engine_runner(dense, "torch", device, dtype, prompts)),
                          ("transformers eager", transformers_runner(hf_model, input_ids)),
                          ("transformers static", transformers_runner(hf_model, input_ids,
                                                                      cache_implementation="static"))):
            try:
                figures[name] = decode_rate(run, batch, args.new_tokens, device, args.repeats)
            except Exception as error:  # a baseline that cannot run here is reported, not fatal
                log(f"{name}: failed: {type(error).__name__}: {error}")
                figures[name] = None
            log(f"{case}: {name} {figures[name]}")
        ours = figures["engine cuda"]
        for name in ("engine torch", "transformers eager", "transformers static"):
            theirs = figures[name]
            entry = row(case, "engine decode (cuda backend)", ours, baseline=name, baseline_value=theirs,
                        ratio=ours / theirs if theirs else None)
            if name == "transformers static" and batch == 1 and theirs:
                with_target(entry, "dense_vs_static")
            rows.append(entry)
        rows.append(with_target(row(case, "engine decode / memory bound", ours, baseline="memory bound",
                                    baseline_value=bound * batch, ratio=ours / (bound * batch),
                                    note="bound: weight bytes per token over bytes copied per second"),
                                "bound_fraction") if batch == 1 else
                    row(case, "engine decode / memory bound", ours, baseline="memory bound (x rows)",
                        baseline_value=bound * batch, ratio=ours / (bound * batch)))
    del hf_model
    if 1 in batches and not args.no_sparse:
        rows += bench_sparse(config, dims, dense, args, device, dtype, log)
    return rows


def bench_sparse(config, dims, dense, args, device, dtype, log):
    from dejavu_llama.modules.sparse_execution import configure_sparse

    prompt = [torch.randint(3, VOCAB, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()]
    dense_rate = decode_rate(engine_runner(dense, "cuda", device, dtype, prompt), 1, args.new_tokens, device,
                             args.repeats)
    sparse = random_engine_model(config, "llama-ml-att-sparse", device, dtype)
    rank = matched_rank(config.hidden_size, config.intermediate_size, multiple=8)
    predictors = random_predictors(config, rank, device=device, dtype=dtype)
    rows = []
    for keep in (0.5, 0.25, 0.1):
        configure_sparse(list(sparse.blocks), "predicted", predictors=predictors, mlp_keep=keep,
                         sparse_attention=False)
        case = f"Llama-3.2-{dims.upper()} dims, {str(dtype)[6:]}, batch 1, predicted MLP, predictor rank {rank}"
        rate = decode_rate(engine_runner(sparse, "cuda", device, dtype, prompt), 1, args.new_tokens, device,
                           args.repeats)
        log(f"{case}: keep {keep}: {rate:.1f} tok/s (dense {dense_rate:.1f})")
        entry = row(case, f"sparse decode, MLP keep {keep}", rate, baseline="dense engine (cuda backend)",
                    baseline_value=dense_rate, ratio=rate / dense_rate,
                    note="random predictors: speed only, the tokens mean nothing")
        rows.append(with_target(entry, f"keep_{keep}") if f"keep_{keep}" in TARGETS else entry)
    predictors.update(random_head_predictors(config, rank, device, dtype))
    configure_sparse(list(sparse.blocks), "predicted", predictors=predictors, mlp_keep=0.5, att_keep=0.5)
    case = f"Llama-3.2-{dims.upper()} dims, {str(dtype)[6:]}, batch 1, predicted MLP and heads, predictor rank {rank}"
    rate = decode_rate(engine_runner(sparse, "cuda", device, dtype, prompt), 1, args.new_tokens, device, args.repeats)
    log(f"{case}: MLP keep 0.5, heads keep 0.5: {rate:.1f} tok/s (dense {dense_rate:.1f})")
    rows.append(row(case, "sparse decode, MLP keep 0.5, heads keep 0.5", rate, baseline="dense engine (cuda backend)",
                    baseline_value=dense_rate, ratio=rate / dense_rate,
                    note="random predictors: speed only, the tokens mean nothing"))
    del sparse
    return rows


def random_head_predictors(config, rank, device, dtype, seed=1):
    """{("att", layer): (predictor, "same")}: Linear(d, rank) -> Linear(rank, heads) per layer, no
    biases, weights N(0, 1/fan_in), as support.random_predictors for the MLP. Speed only."""
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    predictors = {}
    for layer in range(config.num_hidden_layers):
        predictor = nn.Sequential(nn.Linear(config.hidden_size, rank, bias=False),
                                  nn.Linear(rank, config.num_attention_heads, bias=False))
        with torch.no_grad():
            for linear in predictor:
                linear.weight.normal_(0.0, linear.in_features ** -0.5, generator=generator)
        predictors["att", layer] = (predictor.to(device=device, dtype=dtype).requires_grad_(False).eval(), "same")
    return predictors


def bench_sparse_parts(config, dims, device, dtype, log, keeps=(0.5, 0.25, 0.1)):
    """One layer's MLP step by part, each timed alone as CUDA-graph replays (median): where a
    sparse decoding step spends its time against the dense MLP it replaces. On the CPU (the dry
    run, with Triton's interpreter) each part runs twice and the second is timed: a check of the
    calls, not a speed."""
    import torch.nn.functional as F

    from dejavu_llama.modules.decode import triton_sparse

    d, inner = config.hidden_size, config.intermediate_size
    generator = torch.Generator(device=device).manual_seed(0)

    def weight(rows, cols):
        return torch.randn(rows, cols, device=device, dtype=dtype, generator=generator) * cols ** -0.5

    gate, up, down = weight(inner, d), weight(inner, d), weight(d, inner)
    down_t = down.t().contiguous()
    rank = matched_rank(d, inner, multiple=8)
    predictor = random_predictors(config, rank, device=device, dtype=dtype)["mlp", 0][0]
    h = torch.randn(1, d, device=device, dtype=dtype, generator=generator)

    def time_us(fn):
        with torch.inference_mode():
            if device.type == "cuda":
                import triton.testing

                return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
            fn()
            start = time.perf_counter()
            fn()
            return 1e6 * (time.perf_counter() - start)

    dense_us = time_us(lambda: F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down))
    how = "CUDA-graph replays" if device.type == "cuda" else "CPU dry run, Triton interpreted"
    case = f"Llama-3.2-{dims.upper()} dims, {str(dtype)[6:]}, batch 1, one layer's MLP ({how})"
    rows = [row(case, "dense MLP", dense_us, unit="us")]
    scores = F.linear(F.linear(h, predictor[0].weight), predictor[1].weight)
    rows.append(row(case, f"predictor (rank {rank})", time_us(
        lambda: F.linear(F.linear(h, predictor[0].weight), predictor[1].weight)), unit="us"))
    for keep in keeps:
        k = max(1, round(keep * inner))
        top = scores.topk(k, dim=-1).indices[0]
        neurons = top.sort().values
        act = triton_sparse.gather_glu_gemv(h, gate, up, neurons)
        parts = {
            "top-K": lambda: scores.topk(k, dim=-1),
            "top-K unsorted": lambda: scores.topk(k, dim=-1, sorted=False),
            "sort of the kept indices": lambda: top.sort(),
            "top-K sorted, one Triton program": lambda: triton_sparse.top_k_indices(scores, k),
            "gathered gate/up (Triton)": lambda: triton_sparse.gather_glu_gemv(h, gate, up, neurons),
            "gathered down (Triton)": lambda: triton_sparse.gather_columns_gemv(act, down_t, neurons),
            "whole predicted MLP": lambda: triton_sparse.predicted_sparse_mlp(h, h, predictor, k, gate, up, down_t),
        }
        same = torch.equal(triton_sparse.top_k_indices(scores, k)[0], neurons)  # float16 ties may differ
        for name, fn in parts.items():
            value = time_us(fn)
            note = {"note": f"the same kept set as topk: {same}"} if "Triton program" in name else {}
            rows.append(row(case, f"keep {keep}: {name}", value, unit="us", baseline="dense MLP",
                            baseline_value=dense_us, ratio=value / dense_us, **note))
        log(f"{case}: keep {keep}: " + ", ".join(f"{r['measure'].split(': ')[1]} {r['value']:.1f}"
                                                   for r in rows[-len(parts):]) + f" us; dense {dense_us:.1f} us")
    return rows


def triton_interpreted():
    """Whether the Triton kernels run through the interpreter here (TRITON_INTERPRET=1 when they
    were imported): then the CPU dry run checks the parts too."""
    from dejavu_llama.modules.decode import triton_sparse

    return triton_sparse.INTERPRET


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default; without CUDA: a tiny CPU dry run)")
    parser.add_argument("--dims", default="1b,3b", help=f"comma-separated of {', '.join(DIMS)}")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sparse", action="store_true", help="dense figures only")
    parser.add_argument("--quick", action="store_true", help="1b only, 32 new tokens, 2 repeats")
    parser.add_argument("--json", default=os.path.join(RESULTS, "bench_gpu.json"))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    device = torch.device(args.device if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    dims_list = [d.strip() for d in args.dims.split(",") if d.strip()]
    if args.quick:
        dims_list, args.new_tokens, args.repeats = dims_list[:1], 32, 2
    if not cuda:
        print("no CUDA device: a dry run at tiny dims on the CPU (checks the script, measures nothing)")
        dims_list, args.prompt_tokens, args.new_tokens, args.repeats = ["tiny"], 16, 4, 1
    unknown = set(dims_list) - set(DIMS)
    if unknown:
        parser.error(f"--dims: unknown {', '.join(sorted(unknown))}; known: {', '.join(DIMS)}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    log = lambda message: print(message, flush=True)  # noqa: E731
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if cuda else 'CPU dry run'}")
    rows = []
    for dims in dims_list:
        if not args.no_sparse and (cuda or triton_interpreted()):
            rows += bench_sparse_parts(llama_config(dims), dims, device, dtype, log)
        rows += bench_dims(dims, batches, args, device, dtype, log)
        if cuda:
            torch.cuda.empty_cache()
    print(format_table(rows))
    write_json({"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                "dry_run": not cuda, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)  # DEJAVU_CPU_KERNELS, DEJAVU_HUGE_PAGES, ...: read at the command's edge
    sys.exit(main())
