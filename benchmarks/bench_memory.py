"""The memory bound of dense decoding, and the fraction of it the engine reaches.

A decoded token (batch 1) reads every weight of every block and of the LM head once, plus
one embedding row: those bytes divided by the machine's copy bandwidth, measured in this
same run, give the fastest possible decode (the bound, tokens/s). The engine's decode speed
is then measured with the project's `LocalModel.generate_greedy` on SmolLM2-135M-Instruct
(float32) and divided by the bound.

  copy bandwidth  dst.copy_(src) on two large float32 tensors, best of N, counted as bytes
                  read + bytes written (STREAM's convention), on plain tensors and on tensors
                  in transparent huge pages (as the engine's weights); measured before and
                  after the decode runs, the best taken
  decode time     generate_greedy(prompt, N_long) - generate_greedy(prompt, N_short), divided
                  by N_long - N_short: the prompt pass cancels out; median of repeats

Also printed, not used for the bound: a read-only rate (sum of a large tensor) and the rate a
large gemv reaches (what one dense Linear of a decode step can do).

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--threads 1] [--json PATH]

Converts the checkpoint into $ROOT/pretrained_models/smollm2-135m-instruct if it is missing.
"""

import argparse
import os
import platform
import statistics
import time

import torch

from support import DEFAULT_CHECKPOINT, ensure_checkpoint, format_table, result_path, write_json

TARGET_FRACTION = 0.6


def best_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(megabytes, repeats):
    """GB/s of dst.copy_(src), counting bytes read + bytes written: the best of plain tensors
    and of tensors in transparent huge pages (where the engine keeps its weights)."""
    from dejavu_llama.modules.decode.huge_pages import huge_page_buffer

    count = megabytes * 2**20 // 4
    rates = []
    for make in (torch.empty, lambda n: huge_page_buffer(n * 4).view(torch.float32)):
        src, dst = make(count), make(count)
        src.fill_(1.0)
        dst.zero_()
        rates.append(2 * count * 4 / best_time(lambda: dst.copy_(src), repeats) / 1e9)
    return max(rates)


def read_bandwidth(megabytes, repeats):
    count = megabytes * 2**20 // 4
    src = torch.ones(count)
    return count * 4 / best_time(lambda: src.sum(), repeats) / 1e9


def gemv_bandwidth(rows, cols, repeats):
    weight, x = torch.randn(rows, cols), torch.randn(cols)
    return rows * cols * 4 / best_time(lambda: torch.mv(weight, x), repeats) / 1e9


def tensor_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def decode_bytes(model):
    """Weight bytes one decoded token reads (batch 1): all blocks, the head, one embedding row."""
    blocks = sum(sum(p.numel() * p.element_size() for p in block.parameters()) for block in model.blocks)
    head = sum(p.numel() * p.element_size() for p in model.head.parameters())
    embedding = model.embeddings.embed_tokens.weight
    return blocks + head + embedding.shape[1] * embedding.element_size(), blocks, head


def run(quick=False, threads=1, checkpoint=DEFAULT_CHECKPOINT, log=print):
    from dejavu_llama.modules.local_model import LocalModel

    torch.set_num_threads(threads)
    megabytes, repeats = (128, 5) if quick else (256, 10)
    prompt_tokens, short, long, decode_repeats = (16, 4, 20, 2) if quick else (16, 4, 36, 3)
    log(f"memory-bound benchmark: torch {torch.__version__}, threads {torch.get_num_threads()}")

    bandwidths = [copy_bandwidth(megabytes, repeats)]
    read_rate = read_bandwidth(megabytes, repeats)
    gemv_rate = gemv_bandwidth(8192, 3072, repeats)

    checkpoint = ensure_checkpoint(checkpoint, log)
    model = LocalModel.from_checkpoint(checkpoint, "llama", dtype=torch.float32).eval()
    config = model.config
    total_bytes, block_bytes, head_bytes = decode_bytes(model)
    prompt = torch.randint(3, config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def generate(new):
        return model.generate_greedy(prompt, new)

    def decode_seconds():
        """Seconds per decoded token (median), and the long run's tokens."""
        generate(short)  # warm-up: pages the weights in
        tokens = generate(long)
        per_token = []
        for _ in range(decode_repeats):
            start = time.perf_counter()
            generate(short)
            middle = time.perf_counter()
            generate(long)
            end = time.perf_counter()
            per_token.append(((end - middle) - (middle - start)) / (long - short))
        return statistics.median(per_token), per_token, tokens

    seconds_per_token, per_token, tokens = decode_seconds()
    bandwidths.append(copy_bandwidth(megabytes, repeats))
    bandwidth = max(bandwidths)
    all_cores = os.cpu_count() or 1
    all_core_bandwidth = None
    if all_cores > threads:  # what the whole machine copies (the bound above uses `threads`)
        torch.set_num_threads(all_cores)
        all_core_bandwidth = copy_bandwidth(megabytes, repeats)
        torch.set_num_threads(threads)

    measured = 1.0 / seconds_per_token
    bound = bandwidth * 1e9 / total_bytes
    fraction = measured / bound
    context = prompt_tokens + (short + long) / 2
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * \
        (config.hidden_size // config.num_attention_heads) * 4 * context
    case = f"SmolLM2-135M fp32, batch 1, {threads} thread(s)"
    rows = [
        dict(benchmark="memory", case="copy bandwidth", measure=f"dst.copy_(src), {megabytes} MB, best of {repeats}",
             value=bandwidth, unit="GB/s", note=f"runs: {', '.join(f'{b:.1f}' for b in bandwidths)}; "
                                                f"read-only sum {read_rate:.1f} GB/s; gemv 8192x3072 {gemv_rate:.1f} GB/s"),
        dict(benchmark="memory", case=case, measure="weight bytes read per decoded token",
             value=total_bytes / 1e6, unit="MB",
             note=f"blocks {block_bytes / 1e6:.1f} MB + head {head_bytes / 1e6:.1f} MB + 1 embedding row; "
                  f"KV cache read at ~{context:.0f} tokens of context: {kv_bytes / 1e6:.2f} MB (not counted)"),
        dict(benchmark="memory", case=case, measure="memory bound (copy bandwidth / bytes per token)",
             value=bound, unit="tok/s"),
        dict(benchmark="memory", case=case, measure=f"engine decode (generate_greedy, {long}-{short} tokens, "
                                                    f"median of {decode_repeats})",
             value=measured, unit="tok/s", baseline="memory bound", baseline_value=bound, ratio=fraction,
             target=f">= {TARGET_FRACTION}", met=fraction >= TARGET_FRACTION,
             note=f"{seconds_per_token * 1e3:.1f} ms/token; at the gemv rate the bound would be "
                  f"{gemv_rate * 1e9 / total_bytes:.1f} tok/s ({measured / (gemv_rate * 1e9 / total_bytes):.2f} of it)"),
    ]
    if all_core_bandwidth is not None:
        all_bound = all_core_bandwidth * 1e9 / total_bytes
        rows.insert(3, dict(benchmark="memory", case=f"SmolLM2-135M fp32, batch 1, {all_cores} threads",
                            measure=f"memory bound at {all_cores} threads (copy {all_core_bandwidth:.1f} GB/s)",
                            value=all_bound, unit="tok/s",
                            note=f"the engine's {measured:.1f} tok/s at {threads} thread(s) is "
                                 f"{measured / all_bound:.2f} of it"))
    return dict(benchmark="memory", threads=torch.get_num_threads(), torch=torch.__version__,
                machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), quick=quick,
                checkpoint=checkpoint, copy_bandwidths_gbps=bandwidths, all_core_copy_gbps=all_core_bandwidth,
                read_gbps=read_rate, gemv_gbps=gemv_rate,
                bytes_per_token=total_bytes, seconds_per_token=per_token,
                prompt_tokens=prompt_tokens,
                new_tokens=[short, long], rows=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller copies, fewer tokens and repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see README)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", default=result_path("memory"))
    args = parser.parse_args(argv)
    result = run(quick=args.quick, threads=args.threads, checkpoint=args.checkpoint)
    print(format_table(result["rows"]))
    write_json(result, args.json)


if __name__ == "__main__":
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)  # DEJAVU_CPU_KERNELS, DEJAVU_HUGE_PAGES, ...: read at the command's edge
    main()
