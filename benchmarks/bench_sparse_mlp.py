"""Sparse MLP time against dense MLP time at batch 1 (one decoded token), float32, CPU.

For each model's dimensions a stack of MLP layers (the project's `llama-ml-att-sparse` block,
random weights; attention weights are never built) is timed

  dense      the dense MLP as the engine decodes it: one kernel call (the MLP part of the
             fused decoder layer) -- the baseline of every ratio
  dense, torch path   block.mlp in sparse mode "dense" (three DecodeLinears and torch ops)
  sparse     block.mlp in predicted mode: the low-rank predictor Linear(d, D) -> Linear(D, I),
             top-K of its scores, then the gathered MLP on the K kept neurons -- the exact
             code path of decoding, the predictor's own cost included; with the predictor's
             weights in float32 (as trained) and rounded to float16 (--predictor-dtype
             float16, as upstream runs its predictors: half the predictor's bytes)
  gather     block.gathered_mlp alone on fixed kept neurons (no predictor)
  predictor  the predictor and the selection of the K neurons alone (torch ops)
  torch ops  the sparse path with the C kernels switched off (the fallback)

Predictor width. The predictor's weights are read for every token, so its width D decides
what the sparse MLP can save. Upstream's D = 1000 on OPT-175B (d = 12288) reads 5.1% of the
MLP's bytes; the target rows use the D that costs the same share of these models' MLPs
(`matched_D`: 64 for SmolLM2, 341 for Llama-3.2-3B). Reference rows use D = 1000 for the 3B
dims (upstream's number as is: 14.9% of the MLP's bytes) and the study's default
min(1000, d) = 576 for SmolLM2 (46%).

Each layer of the stack has its own weights, and a pass goes over all of them, as a decoded
token does: the weights stream from memory instead of sitting in cache (SmolLM2: 30 layers,
the model's own count; Llama-3.2-3B: 2 layers of 302 MB MLP weights each). The variants are
interleaved round by round; every ratio is the median over rounds of (variant / dense of the
same round), so load on the machine hits both alike.

    .venv/bin/python benchmarks/bench_sparse_mlp.py [--quick] [--threads 1] [--json PATH]
"""

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from support import format_table, result_path, write_json

KEEPS = (0.5, 0.25, 0.1)
TARGETS = {0.5: 0.6, 0.25: 0.35}  # sparse / dense at most
# Upstream DejaVu's predictor on OPT-175B: D = 1000, d = 12288, I = 4d, an MLP of two matrices.
UPSTREAM_SHARE = 1000 * (12288 + 4 * 12288) / (2 * 12288 * 4 * 12288)
# name: hidden d, intermediate I, reference predictor width, layers in the stack, heads, kv heads
CONFIGS = {
    "smollm2-135m": dict(d=576, inter=1536, reference_D=576, layers=30, heads=9, kv_heads=3),
    "llama-3.2-3b": dict(d=3072, inter=8192, reference_D=1000, layers=2, heads=24, kv_heads=8),
}


def matched_D(d, inter):
    """The predictor width whose weights are upstream's share of a gated MLP's (three d x I matrices)."""
    return round(UPSTREAM_SHARE * 3 * d * inter / (d + inter))


def build_blocks(d, inter, layers, heads, kv_heads, generator):
    """Sparse Llama blocks with real MLP and norm weights; attention stays on the meta device."""
    from transformers import LlamaConfig

    from modules.huge_pages import move_to_huge_pages
    from pipeline_parallel.model_registry import load_model_module

    config = LlamaConfig(hidden_size=d, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=64, num_hidden_layers=layers,
                         hidden_act="silu", vocab_size=32)
    block_class = load_model_module("llama-ml-att-sparse").GPTBlock
    blocks = []
    for index in range(layers):
        with torch.device("meta"):
            block = block_class(config, layer_index=index)
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(d), requires_grad=False)
        for linear in (block.gate_proj, block.up_proj, block.down_proj):
            weight = torch.empty(linear.out_features, linear.in_features)
            linear.weight = nn.Parameter(weight.normal_(0.0, 0.02, generator=generator), requires_grad=False)
        move_to_huge_pages(block)  # as the checkpoint loaders do
        block.materialize_buffers()
        blocks.append(block.eval())
    return blocks


def build_predictor(d, D, inter, generator):
    predictor = nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, inter, bias=False))
    for layer in predictor:
        layer.weight.requires_grad_(False)
        layer.weight.normal_(0.0, layer.in_features ** -0.5, generator=generator)
    return predictor.eval()


def unpacked_copy(first, second, output, act_fn):
    """The MLP's Linears with contiguous copies of their weights (the checkpoint's layout)."""
    from modules.huge_pages import move_to_huge_pages
    from modules.sparse_gather import DecodeLinear

    def copy(linear):
        if linear is None:
            return None
        with torch.device("meta"):
            twin = DecodeLinear(linear.in_features, linear.out_features, bias=False)
        twin.weight = nn.Parameter(linear.weight.detach().contiguous().clone(), requires_grad=False)
        move_to_huge_pages(twin)  # as the checkpoint loaders do
        return twin.eval()

    return copy(first), copy(second), copy(output), act_fn


def bench_config(name, spec, rounds, warmup, with_torch_ops, log):
    from modules import cpu_kernels
    from modules.sparse_execution import configure_sparse, kept_count
    from modules.sparse_gather import dense_mlp, store_predictor_half

    d, inter, layers = spec["d"], spec["inter"], spec["layers"]
    widths = {"matched": spec["D"], "reference": spec["reference_D"]}
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    blocks = build_blocks(d, inter, layers, spec["heads"], spec["kv_heads"], generator)
    predictors = {kind: [build_predictor(d, D, inter, generator) for _ in range(layers)] for kind, D in widths.items()}
    predictors["matched float16"] = [build_predictor(d, widths["matched"], inter, generator) for _ in range(layers)]
    for predictor in predictors["matched float16"]:
        store_predictor_half(predictor)  # as configure_sparse(..., predictor_dtype="float16") does
    configure_sparse(blocks, "predicted", mlp_keep=0.5, sparse_attention=False,
                     predictors={("mlp", i): (predictors["matched"][i], "same") for i in range(layers)})
    x = torch.randn(1, 1, d, generator=generator)
    h = blocks[0].post_attention_layernorm(x)
    for block in blocks:
        block.current_inputs = {"mlp_x": x}  # what the predictor reads (set by the tap in forward)
    fixed = {keep: torch.randperm(inter, generator=generator)[: kept_count(keep, inter)].sort().values[None]
             for keep in KEEPS}
    log(f"  {name}: built {layers} layers (d={d}, I={inter}, D={widths['matched']} and {widths['reference']}) "
        f"in {time.perf_counter() - started:.1f} s")

    # The dense baseline reads the checkpoint's layout (contiguous gate, up, down), as the dense
    # model does; the sparse blocks hold the same values packed per neuron (configure_sparse).
    dense_parts = [unpacked_copy(*block.neuron_linears()) for block in blocks]

    def dense():
        for parts in dense_parts:
            dense_mlp(h, *parts)

    def dense_torch_path():
        for block in blocks:
            block.sparse_mode = "dense"
            block.mlp(h, None)

    def sparse(keep, width="matched", kernel=True):
        def run():
            cpu_kernels.ENABLED = kernel
            try:
                for block, predictor in zip(blocks, predictors[width]):
                    object.__setattr__(block, "mlp_predictor", predictor)
                    block.sparse_mode, block.mlp_keep = "predicted", keep
                    block.mlp(h, None)
            finally:
                cpu_kernels.ENABLED = True
        return run

    def gather(keep):
        def run():
            for block in blocks:
                block.gathered_mlp(h, fixed[keep])
        return run

    def predictor_only(keep, width):
        k = kept_count(keep, inter)

        def run():
            for block, predictor in zip(blocks, predictors[width]):
                mask = block.select(predictor, block.predictor_input("mlp"), keep, inter)
                mask[:, 0].nonzero()[:, 1].view(1, k)
        return run

    variants = {("dense", None): dense, ("dense torch path", None): dense_torch_path}
    for keep in KEEPS:
        variants[("sparse", keep)] = sparse(keep)
        variants[("sparse float16", keep)] = sparse(keep, "matched float16")
        variants[("sparse reference", keep)] = sparse(keep, "reference")
        variants[("gather", keep)] = gather(keep)
        if with_torch_ops:
            variants[("torch ops", keep)] = sparse(keep, kernel=False)
    variants[("predictor", 0.25)] = predictor_only(0.25, "matched")
    variants[("predictor reference", 0.25)] = predictor_only(0.25, "reference")

    times = {key: [] for key in variants}
    with torch.inference_mode():
        # The paths timed compute the right thing: gathered = masked MLP, kernel dense = torch dense.
        block = blocks[0]
        keep_mask = torch.zeros(1, 1, inter, dtype=torch.bool).scatter_(-1, fixed[0.25][:, None], True)
        masked = block.mlp_output(block.mlp_activation(h) * keep_mask)
        error = (block.gathered_mlp(h, fixed[0.25]) - masked).abs().max().item()
        fast_dense = dense_mlp(h, *dense_parts[0])
        if fast_dense is None:
            raise SystemExit(f"the dense MLP kernel does not run here: {cpu_kernels.unavailable_reason()}")
        dense_error = (fast_dense - block.mlp_output(block.mlp_activation(h))).abs().max().item()
        for round_index in range(warmup + rounds):
            for key, run in variants.items():
                start = time.perf_counter()
                run()
                if round_index >= warmup:
                    times[key].append((time.perf_counter() - start) / layers)
    dense_times = times[("dense", None)]
    dense_median = statistics.median(dense_times)
    mlp_bytes = 3 * d * inter * 4
    predictor_bytes = {kind: (d * D + D * inter) * 4 for kind, D in widths.items()}
    rows = []
    case = f"{name} d={d} I={inter}"
    rows.append(dict(benchmark="sparse_mlp", case=case, measure="dense MLP (one kernel call, as decoding runs it)",
                     keep=1.0, value=dense_median * 1e6, unit="us/layer", baseline=None, baseline_value=None,
                     ratio=None, note=f"{mlp_bytes / dense_median / 1e9:.1f} GB/s of MLP weights"))
    matched, reference = widths["matched"], widths["reference"]
    labels = {"dense torch path": "dense MLP, torch path (3 DecodeLinears + ops)",
              "sparse": f"sparse MLP, predictor D={matched} included",
              "sparse float16": f"sparse MLP, predictor D={matched} in float16 included",
              "sparse reference": f"sparse MLP, predictor D={reference} included (reference)",
              "gather": "gathered MLP only (no predictor)",
              "torch ops": f"sparse MLP, D={matched}, torch ops (no C kernel)",
              "predictor": f"predictor D={matched} + top-K only (torch ops)",
              "predictor reference": f"predictor D={reference} + top-K only (torch ops)"}
    keys = [("dense torch path", None)] + [(kind, keep) for keep in KEEPS for kind in (
        "sparse", "sparse float16", "sparse reference", "gather", "torch ops")] + [("predictor", 0.25), ("predictor reference", 0.25)]
    for kind, keep in keys:
        if (kind, keep) not in times:
            continue
        samples = times[kind, keep]
        ratio = statistics.median(a / b for a, b in zip(samples, dense_times))
        row = dict(benchmark="sparse_mlp", case=case if keep is None else f"{case} keep={keep}", measure=labels[kind],
                   keep=keep, value=statistics.median(samples) * 1e6, unit="us/layer", baseline="dense MLP",
                   baseline_value=dense_median * 1e6, ratio=ratio)
        if kind in ("sparse", "sparse float16") and keep in TARGETS:
            row.update(target=f"<= {TARGETS[keep]}", met=ratio <= TARGETS[keep])
        if kind.startswith("predictor"):
            share = predictor_bytes["matched" if kind == "predictor" else "reference"] / mlp_bytes
            row["note"] = f"predictor weights = {share:.3f} of the MLP's"
        rows.append(row)
    info = dict(d=d, I=inter, D=matched, reference_D=reference, layers=layers, rounds=rounds, warmup=warmup,
                mlp_bytes=mlp_bytes, predictor_bytes=predictor_bytes["matched"],
                reference_predictor_bytes=predictor_bytes["reference"], upstream_share=UPSTREAM_SHARE,
                gathered_vs_masked_max_abs_error=error, kernel_dense_vs_torch_max_abs_error=dense_error)
    return rows, info


def run(quick=False, threads=1, configs=None, smollm2_D=None, llama_D=None, torch_ops=True, log=print):
    from modules import cpu_kernels

    torch.set_num_threads(threads)
    specs = {name: dict(spec, D=matched_D(spec["d"], spec["inter"]))
             for name, spec in CONFIGS.items() if not configs or name in configs}
    if smollm2_D and "smollm2-135m" in specs:
        specs["smollm2-135m"]["D"] = smollm2_D
    if llama_D and "llama-3.2-3b" in specs:
        specs["llama-3.2-3b"]["D"] = llama_D
    kernel = cpu_kernels.kernel_library() is not None
    log(f"sparse MLP benchmark: torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"C kernels {'on' if kernel else 'OFF: ' + cpu_kernels.unavailable_reason()}")
    rows, infos = [], {}
    for name, spec in specs.items():
        big = spec["d"] * spec["inter"] > 4_000_000
        rounds = (6 if big else 15) if quick else (20 if big else 60)
        r, info = bench_config(name, spec, rounds=rounds, warmup=2, with_torch_ops=torch_ops, log=log)
        rows += r
        infos[name] = info
    return dict(benchmark="sparse_mlp", threads=torch.get_num_threads(), torch=torch.__version__,
                machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                gather_kernel=kernel, quick=quick, configs=infos, rows=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a quarter of the time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see README)")
    parser.add_argument("--configs", default="", help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--smollm2-D", type=int, default=None, help="predictor width of the target rows for SmolLM2 (default: matched_D, 64)")
    parser.add_argument("--llama-D", type=int, default=None, help="predictor width of the target rows for Llama-3.2-3B (default: matched_D, 341)")
    parser.add_argument("--no-torch-ops", action="store_true", help="skip the kernel-off comparison rows")
    parser.add_argument("--json", default=result_path("sparse_mlp"))
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown config(s) {', '.join(sorted(unknown))}; known: {', '.join(CONFIGS)}")
    result = run(quick=args.quick, threads=args.threads, configs=configs, smollm2_D=args.smollm2_D,
                 llama_D=args.llama_D, torch_ops=not args.no_torch_ops)
    print(format_table(result["rows"]))
    write_json(result, args.json)


if __name__ == "__main__":
    main()
