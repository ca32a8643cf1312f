"""Sparse MLP time against dense MLP time at batch 1 (one decoded token), CPU, weights in float32 or half precision.

Decoding runs a Llama layer in one kernel call: the attention half, then the dense MLP, or in a
sparse block (`llama-ml-att-sparse`, predicted mode) DejaVu's predicted MLP: the low-rank
predictor Linear(d, D) -> Linear(D, I), the top K of its scores and the MLP on the K kept
neurons. The MLP's time as decoding runs it is what it adds to the layer:

  in the layer    (layer with that MLP) - (the same layer's attention half alone), both timed
                  through the steps decoding runs (decode/cpu.py: kernel_step for the dense and
                  the sparse layer, attention_half_step for the half, each prepared once as a
                  sequence's first token prepares it, the layers of a pass sharing its position
                  arguments), every allocation included. Dense is the baseline of the target ratios. The sparse
                  rows run with the predictor's weights in float32 (as trained) and rounded to
                  float16 (--predictor-dtype float16, as upstream runs its predictors: half the
                  predictor's bytes).
  standalone      one MLP on its own, one call per layer: the dense MLP kernel, and block.mlp in
                  predicted mode (the torch path's entry, which calls the same one-call kernel)
  gather          the gathered MLP alone on fixed kept neurons (no predictor); and on every
                  neuron in order, which reads the dense MLP's bytes as one run per layer: against
                  the dense MLP it is the gather's own streaming, against the kept rows the cost
                  of their being scattered
  predictor       the predictor and the selection of the K neurons alone (torch ops)
  torch ops       block.mlp with the C kernels switched off (the fallback)

Predictor width. The predictor's weights are read for every token, so its width D decides
what the sparse MLP can save. Upstream's D = 1000 on OPT-175B (d = 12288) reads 5.1% of the
MLP's bytes; the target rows use the D that costs the same share of these models' MLPs
(`matched_D`: 64 for SmolLM2, 341 for Llama-3.2-3B). Reference rows use D = 1000 for the 3B
dims (upstream's number as is: 14.9% of the MLP's bytes) and the study's default
min(1000, d) = 576 for SmolLM2 (46%).

--dtype bfloat16|float16 stores the layers' weights in that dtype (as a checkpoint loaded with
the runner's --dtype): the kernels read them as they are, with float32 activations and KV
caches, so the MLP's bytes halve and the targets apply as in float32. The predictors stay in
float32 (and float16 for the float16 rows); the torch-op rows run in float32 only.

Each layer of the stack has its own weights (random; the dense and the sparse layers the same
values, the sparse ones packed per neuron by configure_sparse) and a KV cache of CONTEXT
positions; a pass decodes one token through all of them, so the weights stream from memory
instead of sitting in cache (SmolLM2: 30 layers, the model's own count; Llama-3.2-3B: 2 layers
of 302 MB of MLP and 101 MB of attention weights). Each timed step decodes the same position
again. The variants are interleaved round by round; every ratio is the median over rounds of
(variant / baseline of the same round), so load on the machine hits both alike. --threads sets
torch's threads and the C kernels'; with more than one, the variants that run torch ops are
followed by an untimed pass of the attention halves (TORCH_OP_KINDS: torch's OpenMP workers
spin after them, on the core the kernels' worker needs).

    .venv/bin/python benchmarks/bench_sparse_mlp.py [--quick] [--threads 1] [--dtype bfloat16] [--json PATH]
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
CONTEXT = 128  # positions in each layer's KV cache
# With several threads, torch's OpenMP workers spin after each parallel region (libgomp: about
# 3 ms by default) on the core the C kernels' worker thread needs: a kernel variant timed right
# after the torch-op variants below ran up to a third slower at 2 threads (keep 0.25 in the
# layer: 0.48-0.51 of the dense MLP after them, 0.36-0.40 without them). Decoding runs no such
# op between its layers, so those variants are followed by an untimed pass of the attention
# halves (a pause instead would let the cores idle, and a pass after idling is slower too).
TORCH_OP_KINDS = {"dense torch path", "torch ops", "predictor", "predictor reference"}
# Upstream DejaVu's predictor on OPT-175B: D = 1000, d = 12288, I = 4d, an MLP of two matrices.
UPSTREAM_SHARE = 1000 * (12288 + 4 * 12288) / (2 * 12288 * 4 * 12288)
# name: hidden d, intermediate I, reference predictor width, layers in the stack, heads, kv heads, head dim
CONFIGS = {
    "smollm2-135m": dict(d=576, inter=1536, reference_D=576, layers=30, heads=9, kv_heads=3, head_dim=64),
    "llama-3.2-3b": dict(d=3072, inter=8192, reference_D=1000, layers=2, heads=24, kv_heads=8, head_dim=128),
}


def matched_D(d, inter):
    """The predictor width whose weights are upstream's share of a gated MLP's (three d x I matrices)."""
    return round(UPSTREAM_SHARE * 3 * d * inter / (d + inter))


def build_layers(spec, generator, dtype=torch.float32):
    """(dense `llama` blocks, sparse `llama-ml-att-sparse` blocks, KV caches): decoder layers with
    the same random weights in `dtype`, in huge pages as a checkpoint loads on the CPU, and a
    float32 KV cache of CONTEXT positions per layer (filled by a prompt pass of the dense layer,
    in float32 as a half-precision model's first decoded token leaves it)."""
    from transformers import LlamaConfig

    from dejavu_llama.modules.decode.cpu import float32_cache
    from dejavu_llama.modules.decode.huge_pages import move_to_huge_pages
    from dejavu_llama.pipeline_parallel.model_registry import load_model_module

    d = spec["d"]
    config = LlamaConfig(hidden_size=d, intermediate_size=spec["inter"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["kv_heads"], head_dim=spec["head_dim"],
                         num_hidden_layers=spec["layers"], hidden_act="silu", vocab_size=32)
    classes = [load_model_module(kind).GPTBlock for kind in ("llama", "llama-ml-att-sparse")]
    dense_blocks, sparse_blocks, caches = [], [], []
    for index in range(spec["layers"]):
        weights = None
        for block_class, blocks in zip(classes, (dense_blocks, sparse_blocks)):
            with torch.device("meta"):
                block = block_class(config, layer_index=index)
            if weights is None:  # norms 1, matrices N(0, 0.02)
                weights = {name: (torch.ones(p.shape) if p.dim() == 1 else torch.empty(p.shape).normal_(
                    0.0, 0.02, generator=generator)).to(dtype) for name, p in block.named_parameters()}
            block.load_state_dict({name: w.clone() for name, w in weights.items()}, assign=True)
            block.requires_grad_(False)
            move_to_huge_pages(block)
            block.materialize_buffers()
            blocks.append(block.eval())
        with torch.inference_mode():
            prompt = torch.randn(1, CONTEXT, d, generator=generator).to(dtype)
            caches.append(float32_cache(dense_blocks[-1](prompt)[1]))
    return dense_blocks, sparse_blocks, caches


def build_predictor(d, D, inter, generator):
    predictor = nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, inter, bias=False))
    for layer in predictor:
        layer.weight.requires_grad_(False)
        layer.weight.normal_(0.0, layer.in_features ** -0.5, generator=generator)
    return predictor.eval()


def rewind(cache):
    """Let the next step decode the cache's next position again (KVCache.grown copies a cache
    whose buffers already hold a later position)."""
    cache.buffers.filled = cache.length


def bench_config(name, spec, rounds, warmup, with_torch_ops, log, dtype=torch.float32):
    from dejavu_llama.modules import cpu_kernels
    from dejavu_llama.modules.decode import choose_backend, cpu, cpu_views
    from dejavu_llama.modules.decode.sparse_gather import dense_mlp, gathered_mlp, round_predictor
    from dejavu_llama.modules.sparse_execution import configure_sparse, kept_count, select

    d, inter, layers = spec["d"], spec["inter"], spec["layers"]
    widths = {"matched": spec["D"], "reference": spec["reference_D"]}
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    dense_blocks, blocks, caches = build_layers(spec, generator, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    predictors = {kind: [build_predictor(d, D, inter, generator) for _ in range(layers)] for kind, D in widths.items()}
    predictors["matched float16"] = [build_predictor(d, widths["matched"], inter, generator) for _ in range(layers)]
    for predictor in predictors["matched float16"]:
        round_predictor(predictor, torch.float16)  # as configure_sparse(..., predictor_dtype="float16") does
    configure_sparse(blocks, "predicted", mlp_keep=0.5, sparse_attention=False,
                     predictors={("mlp", i): (predictors["matched"][i], "same") for i in range(layers)})
    cpu_backend = choose_backend("cpu", "cpu")
    dense_plan, torch_plan = cpu_backend.prepare(dense_blocks), choose_backend("torch", "cpu").prepare(blocks)
    plans = {"sparse": cpu_backend.prepare(blocks)}  # a new one for each predictor set-up (use)
    x = torch.randn(1, 1, d, generator=generator)
    h = blocks[0].post_attention_layernorm(x).float()  # the kernels read float32 activations
    fixed = {keep: torch.randperm(inter, generator=generator)[: kept_count(keep, inter)].sort().values[None]
             for keep in KEEPS}
    fixed[1.0] = torch.arange(inter)[None]  # every neuron, in order
    log(f"  {name}: built {layers} layers in {dtype_name} "
        f"(d={d}, I={inter}, D={widths['matched']} and {widths['reference']}) "
        f"in {time.perf_counter() - started:.1f} s")

    def use(keep, width):
        """Untimed: install the predictors and K, make the plan of that set-up and let each layer
        build its kernel view (as the first decoded token would)."""
        def setup():
            for block, predictor in zip(blocks, predictors[width]):
                block.mlp.predictor, block.mlp.keep = predictor, keep
                block.mlp.predictor_rounded = torch.float16 if width.endswith("float16") else None
                block.taps.inputs["mlp_x"] = x  # what the standalone block.mlp's predictor reads
            plan = plans.get((keep, width))
            if plan is None:  # one plan per set-up, kept: what a run derives once
                plan = plans[keep, width] = cpu_backend.prepare(blocks)
            plans["sparse"] = plan
            for block in blocks:
                cpu_views.layer_view(plan, block, cpu.family_of(block).build)
        return setup

    # In the layer: what decoding runs, each layer's step prepared as a sequence's first token
    # prepares it (cpu.DecodingSteps), the step's position arguments shared by its layers.
    prepared = {}

    def prepare(name, make, which, before=None):
        def setup():
            if before is not None:
                before()
            plan = dense_plan if which is dense_blocks else plans["sparse"]
            prepared[name] = [make(plan, block, x, cache) for block, cache in zip(which, caches)]
        return setup

    def layer(name):
        def run():
            shared = {}
            for step, cache in zip(prepared[name], caches):
                rewind(cache)
                step(x, cache, None, shared)
        return run

    # Standalone: one MLP per call. The dense one reads the dense layers' own (checkpoint) layout.
    def dense():
        for block in dense_blocks:
            dense_mlp(dense_plan, h, *block.mlp.neuron_linears())

    def dense_torch_path():
        for block in dense_blocks:
            block.mlp(h)

    def sparse(kernel=True):
        def run():
            with (plans["sparse"] if kernel else torch_plan).running():
                for block in blocks:
                    block.mlp(h)
        return run

    def gather(keep):
        def run():
            for block in blocks:
                gathered_mlp(plans["sparse"], h, fixed[keep], *block.mlp.neuron_linears())
        return run

    def predictor_only(keep, width):
        k = kept_count(keep, inter)

        def run():
            for block, predictor in zip(blocks, predictors[width]):
                mask = select(predictor, x, keep, inter)  # x: the MLP's input, what it reads
                mask[:, 0].nonzero()[:, 1].view(1, k)
        return run

    def nothing():
        pass

    # (kind, keep): (untimed setup, timed run)
    variants = {("layer dense", None): (prepare("dense", cpu.kernel_step, dense_blocks), layer("dense")),
                ("layer attention", None): (prepare("attention", cpu.attention_half_step, blocks), layer("attention")),
                ("dense", None): (nothing, dense)}
    with_torch_ops = with_torch_ops and dtype == torch.float32  # torch's ops would read h in the weights' dtype
    if with_torch_ops:
        variants[("dense torch path", None)] = (nothing, dense_torch_path)
    for keep in KEEPS:
        for kind, width in (("", "matched"), (" float16", "matched float16"), (" reference", "reference")):
            variants[("layer sparse" + kind, keep)] = (prepare("sparse", cpu.kernel_step, blocks, use(keep, width)),
                                                       layer("sparse"))
            variants[("sparse" + kind, keep)] = (use(keep, width), sparse())
        variants[("gather", keep)] = (nothing, gather(keep))
        if with_torch_ops:
            variants[("torch ops", keep)] = (use(keep, "matched"), sparse(kernel=False))
    variants[("gather all", 1.0)] = (nothing, gather(1.0))
    variants[("predictor", 0.25)] = (nothing, predictor_only(0.25, "matched"))
    variants[("predictor reference", 0.25)] = (nothing, predictor_only(0.25, "reference"))

    times = {key: [] for key in variants}
    with torch.inference_mode():
        # The paths timed compute the right thing: gathered = masked MLP, kernel dense = torch
        # dense, and the layer with the predicted MLP = its attention half + the predicted MLP.
        block = blocks[0]
        keep_mask = torch.zeros(1, 1, inter, dtype=torch.bool).scatter_(-1, fixed[0.25][:, None], True)
        h_torch = h.to(dtype)  # torch's reference runs in the weights' dtype
        masked = block.mlp.output(block.mlp.activation(h_torch) * keep_mask).float()
        error = (gathered_mlp(plans["sparse"], h, fixed[0.25], *block.mlp.neuron_linears()) - masked).abs().max().item()
        fast_dense = dense_mlp(dense_plan, h, *dense_blocks[0].mlp.neuron_linears())
        if fast_dense is None:
            raise SystemExit(f"the dense MLP kernel does not run here: {cpu_kernels.unavailable_reason()}")
        dense_error = (fast_dense - block.mlp.output(block.mlp.activation(h_torch)).float()).abs().max().item()
        use(0.25, "matched")()
        plan = plans["sparse"]
        rewind(caches[0])
        whole = cpu.cpu_step(plan, block, x, caches[0], None)
        rewind(caches[0])
        x_mid, h_mid, _ = cpu.attention_half_step(plan, block, x, caches[0])(x, caches[0], None)
        block.taps.inputs["mlp_x"] = x_mid
        with plan.running():
            layer_error = (whole[0] - (x_mid + block.mlp(h_mid))).abs().max().item()
        block.taps.inputs["mlp_x"] = x
        for round_index in range(warmup + rounds):
            for key, (setup, run) in variants.items():
                setup()
                start = time.perf_counter()
                run()
                if round_index >= warmup:
                    times[key].append((time.perf_counter() - start) / layers)
                if key[0] in TORCH_OP_KINDS and torch.get_num_threads() > 1:
                    layer("attention")()  # untimed, while torch's OpenMP workers stop spinning
    # The MLP in the layer, per round: the layer minus its attention half.
    attention = times[("layer attention", None)]
    in_layer = {key: [t - a for t, a in zip(samples, attention)] for key, samples in times.items()
                if key[0].startswith("layer ") and key[0] != "layer attention"}
    mlp_bytes = 3 * d * inter * dtype.itemsize
    predictor_bytes = {kind: (d * D + D * inter) * 4 for kind, D in widths.items()}
    matched, reference = widths["matched"], widths["reference"]
    case = f"{name} d={d} I={inter}" + ("" if dtype == torch.float32 else f" {dtype_name}")

    def median_us(samples):
        return statistics.median(samples) * 1e6

    layer_dense_mlp = in_layer[("layer dense", None)]
    rows = [
        dict(benchmark="sparse_mlp", case=case, measure="decoder layer, dense MLP (one kernel call)", keep=1.0,
             value=median_us(times[("layer dense", None)]), unit="us/layer", baseline=None, baseline_value=None,
             ratio=None),
        dict(benchmark="sparse_mlp", case=case, measure="decoder layer, attention half only", keep=None,
             value=median_us(attention), unit="us/layer", baseline=None, baseline_value=None, ratio=None),
        dict(benchmark="sparse_mlp", case=case, measure="dense MLP in the layer (layer - attention half)", keep=1.0,
             value=median_us(layer_dense_mlp), unit="us/layer", baseline=None, baseline_value=None, ratio=None,
             note=f"{mlp_bytes / statistics.median(layer_dense_mlp) / 1e9:.1f} GB/s of MLP weights"),
        dict(benchmark="sparse_mlp", case=case, measure="dense MLP standalone (one kernel call)", keep=1.0,
             value=median_us(times[("dense", None)]), unit="us/layer", baseline=None, baseline_value=None,
             ratio=None),
    ]
    labels = {"layer sparse": f"sparse MLP in the layer, predictor D={matched} included",
              "layer sparse float16": f"sparse MLP in the layer, predictor D={matched} in float16 included",
              "layer sparse reference": f"sparse MLP in the layer, predictor D={reference} included (reference)",
              "dense torch path": "dense MLP standalone, torch path (3 one-row kernel Linears + ops)",
              "sparse": f"sparse MLP standalone (block.mlp), D={matched}",
              "sparse float16": f"sparse MLP standalone (block.mlp), D={matched} in float16",
              "sparse reference": f"sparse MLP standalone (block.mlp), D={reference} (reference)",
              "gather": "gathered MLP standalone, no predictor",
              "gather all": "gathered MLP standalone, every neuron in order",
              "torch ops": f"sparse MLP standalone, D={matched}, torch ops (no C kernel)",
              "predictor": f"predictor D={matched} + top-K only (torch ops)",
              "predictor reference": f"predictor D={reference} + top-K only (torch ops)"}
    keys = [("dense torch path", None), ("gather all", 1.0)] + [(kind, keep) for keep in KEEPS for kind in (
        "layer sparse", "layer sparse float16", "layer sparse reference", "sparse", "sparse float16",
        "sparse reference", "gather", "torch ops")] + [("predictor", 0.25), ("predictor reference", 0.25)]
    for kind, keep in keys:
        if (kind, keep) not in times:
            continue
        in_the_layer = kind.startswith("layer ")
        samples = in_layer[kind, keep] if in_the_layer else times[kind, keep]
        baseline = layer_dense_mlp if in_the_layer else times[("dense", None)]
        ratio = statistics.median(a / b for a, b in zip(samples, baseline))
        row = dict(benchmark="sparse_mlp", case=case if keep is None else f"{case} keep={keep}", measure=labels[kind],
                   keep=keep, value=median_us(samples), unit="us/layer",
                   baseline="dense MLP in the layer" if in_the_layer else "dense MLP standalone",
                   baseline_value=median_us(baseline), ratio=ratio)
        if kind in ("layer sparse", "layer sparse float16") and keep in TARGETS:
            row.update(target=f"<= {TARGETS[keep]}", met=ratio <= TARGETS[keep])
        if kind.startswith("layer sparse") and kind != "layer sparse reference":
            layer_ratio = statistics.median(a / b for a, b in zip(times[kind, keep], times[("layer dense", None)]))
            row["note"] = f"whole layer {layer_ratio:.3f} of the dense layer"
        if kind == "gather":
            in_order = times[("gather all", 1.0)]  # reads keep / 1 of these bytes
            rate = statistics.median(keep * a / b for a, b in zip(in_order, samples))
            row["note"] = f"reads its rows at {rate:.2f} of the in-order gather's rate"
        if kind.startswith("predictor"):
            share = predictor_bytes["matched" if kind == "predictor" else "reference"] / mlp_bytes
            row["note"] = f"predictor weights = {share:.3f} of the MLP's"
        rows.append(row)
    info = dict(d=d, I=inter, D=matched, reference_D=reference, layers=layers, context=CONTEXT, rounds=rounds,
                warmup=warmup, dtype=dtype_name, mlp_bytes=mlp_bytes, predictor_bytes=predictor_bytes["matched"],
                reference_predictor_bytes=predictor_bytes["reference"], upstream_share=UPSTREAM_SHARE,
                gathered_vs_masked_max_abs_error=error, kernel_dense_vs_torch_max_abs_error=dense_error,
                predicted_layer_vs_its_steps_max_abs_error=layer_error)
    return rows, info


def run(quick=False, threads=1, configs=None, smollm2_D=None, llama_D=None, torch_ops=True, dtype="float32",
        log=print):
    from dejavu_llama.modules import cpu_kernels

    torch.set_num_threads(threads)
    cpu_kernels.set_num_threads(threads)
    specs = {name: dict(spec, D=matched_D(spec["d"], spec["inter"]))
             for name, spec in CONFIGS.items() if not configs or name in configs}
    if smollm2_D and "smollm2-135m" in specs:
        specs["smollm2-135m"]["D"] = smollm2_D
    if llama_D and "llama-3.2-3b" in specs:
        specs["llama-3.2-3b"]["D"] = llama_D
    kernel = cpu_kernels.kernel_library() is not None
    log(f"sparse MLP benchmark: torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"C kernels {f'on ({cpu_kernels.num_threads()} threads)' if kernel else 'OFF: ' + cpu_kernels.unavailable_reason()}")
    rows, infos = [], {}
    for name, spec in specs.items():
        big = spec["d"] * spec["inter"] > 4_000_000
        rounds = (6 if big else 15) if quick else (20 if big else 60)
        r, info = bench_config(name, spec, rounds=rounds, warmup=2, with_torch_ops=torch_ops, log=log,
                               dtype=getattr(torch, dtype))
        rows += r
        infos[name] = info
    return dict(benchmark="sparse_mlp", threads=torch.get_num_threads(), kernel_threads=cpu_kernels.num_threads(),
                torch=torch.__version__,
                machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                gather_kernel=kernel, quick=quick, dtype=dtype, configs=infos, rows=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a quarter of the time)")
    parser.add_argument("--threads", type=int, default=1, help="torch's and the C kernels' threads (default 1; see README)")
    parser.add_argument("--configs", default="", help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--smollm2-D", type=int, default=None, help="predictor width of the target rows for SmolLM2 (default: matched_D, 64)")
    parser.add_argument("--llama-D", type=int, default=None, help="predictor width of the target rows for Llama-3.2-3B (default: matched_D, 341)")
    parser.add_argument("--no-torch-ops", action="store_true", help="skip the kernel-off comparison rows")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the layers' weights (activations and caches stay float32; default float32)")
    parser.add_argument("--json", default=result_path("sparse_mlp"))
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown config(s) {', '.join(sorted(unknown))}; known: {', '.join(CONFIGS)}")
    result = run(quick=args.quick, threads=args.threads, configs=configs, smollm2_D=args.smollm2_D,
                 llama_D=args.llama_D, torch_ops=not args.no_torch_ops, dtype=args.dtype)
    print(format_table(result["rows"]))
    write_json(result, args.json)


if __name__ == "__main__":
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)  # DEJAVU_CPU_KERNELS, DEJAVU_HUGE_PAGES, ...: read at the command's edge
    main()
