"""Collection throughput: the one-stage engine with llama-save (dumping) against plain llama.

Same model (SmolLM2-135M-Instruct, float32), same prompts (real English documents cut to
--prompt-tokens, batch --batch), prompt phase only with echoed log-probabilities, exactly what
`*_collect_sp_data.sh` runs. The save run writes every layer's four files and meta.json into a
scratch folder (--dump-dir, default a temporary folder, removed at the end), recreated before
each timed round so every round writes the same rows. Dense and save rounds alternate; the
ratio is the median over rounds of dense time / save time (= save throughput / dense
throughput). Target: >= 0.7. An extra row flushes the files and meta.json after every batch
(--sp-commit-seconds 0) instead of every 10 s.

    .venv/bin/python benchmarks/bench_collect.py [--quick] [--threads 1]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

from bench_engine import make_prompts
from support import DEFAULT_CHECKPOINT, ensure_checkpoint, result_path, write_json

TARGET = 0.7


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 batches per round, 2 rounds")
    parser.add_argument("--dump-dir", default=None, help="scratch folder for the dump (default: a temporary one)")
    parser.add_argument("--json", default=result_path("collect"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.rounds = 2, 2

    import torch
    from transformers import AutoTokenizer

    from dejavu_llama.comm.comm_utils import LocalCommunicator
    from dejavu_llama.modules.local_model import LocalModel
    from dejavu_llama.pipeline_parallel.dist_pipeline_inference_mask_greedy_token_pipe_sync import DistInferenceMaskTokenPipeSync
    from dejavu_llama.pipeline_parallel.model_registry import load_model_module

    torch.set_num_threads(args.threads)
    checkpoint = ensure_checkpoint(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = make_prompts(tokenizer, args.batch * args.batches, args.prompt_tokens)
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    settings = [{"temperature": 0.0, "top_p": 1.0, "top_k": 0, "logprobs": 1, "echo": True}] * args.batch
    rows = len(prompts) * args.prompt_tokens

    def engine_for(model_type):
        model = LocalModel.from_checkpoint(checkpoint, model_type, dtype=torch.float32)
        engine = DistInferenceMaskTokenPipeSync(
            LocalCommunicator(), 0, 1, model.embeddings, model.blocks, model.head, model.config.hidden_size,
            "cpu", torch.float32, micro_batch_size=args.batch,
        )
        return model, engine

    dense_model, dense = engine_for("llama")
    save_model, save = engine_for("llama-save")
    save_module = load_model_module("llama-save")
    scratch = args.dump_dir or tempfile.mkdtemp(prefix="bench_collect_")
    folder = os.path.join(scratch, "dump")

    def new_writer(commit_seconds=None):
        shutil.rmtree(folder, ignore_errors=True)
        dump_args = SimpleNamespace(
            sp_data_path=folder, sp_rows=rows + 1, sp_resume=False, sp_force=True, model_name=checkpoint,
            model_type="llama-save", infer_data="bench", pipeline_group_size=1,
            num_layers=len(save_model.blocks), rank=0,
        )
        if commit_seconds is not None:
            dump_args.sp_commit_seconds = commit_seconds
        return save_module.prepare_stage(list(save_model.blocks), dump_args, save_model.config)

    def run(engine, writer=None):
        start = time.perf_counter()
        for batch in batches:
            engine.inference_batch(batch, 0, settings)
        if writer is not None:
            writer.close(True)
        return time.perf_counter() - start

    try:
        run(dense)
        run(save, new_writer())  # warm-up
        dense_times, save_times, eager_times = [], [], []
        for _ in range(args.rounds):
            dense_times.append(run(dense))
            save_times.append(run(save, new_writer()))
            eager_times.append(run(save, new_writer(commit_seconds=0.0)))
        with open(os.path.join(folder, "meta.json")) as handle:
            meta = json.load(handle)
        dump_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".mmap"))
    finally:
        if args.dump_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if meta["tokens"] != rows or not meta["complete"]:
        sys.exit(f"the dump holds {meta['tokens']} rows (complete: {meta['complete']}), expected {rows}")

    ratios = [d / s for d, s in zip(dense_times, save_times)]
    eager_ratio = statistics.median(d / s for d, s in zip(dense_times, eager_times))
    ratio = statistics.median(ratios)
    dense_rate = rows / statistics.median(dense_times)
    save_rate = rows / statistics.median(save_times)
    case = (f"SmolLM2-135M-Instruct (float32), {len(batches)} batches of {args.batch} x {args.prompt_tokens} "
            f"tokens, {args.threads} thread(s)")
    report = {
        "checkpoint": checkpoint, "tokens": rows, "dump_bytes_per_round": dump_bytes, "threads": args.threads,
        "dense_seconds": dense_times, "save_seconds": save_times, "save_flush_every_batch_seconds": eager_times,
        "ratios": ratios, "torch": torch.__version__,
    }
    report["rows"] = [
        {"benchmark": "collect", "case": case, "measure": "dense prompt (llama)", "value": dense_rate,
         "unit": "tok/s"},
        {"benchmark": "collect", "case": case, "measure": "collection (llama-save)", "value": save_rate,
         "unit": "tok/s", "baseline": "dense prompt", "baseline_value": dense_rate, "ratio": ratio,
         "target": f">= {TARGET}", "met": ratio >= TARGET,
         "note": f"{dump_bytes / 1e6:.0f} MB dumped per round ({dump_bytes / rows / 1e3:.0f} kB per token)"},
        {"benchmark": "collect", "case": case, "measure": "collection, flush after every batch",
         "value": rows / statistics.median(eager_times), "unit": "tok/s", "baseline": "dense prompt",
         "baseline_value": dense_rate, "ratio": eager_ratio},
    ]
    write_json(report, args.json)
    print(f"dense (llama)        {dense_rate:8.1f} tok/s")
    print(f"collect (llama-save) {save_rate:8.1f} tok/s   {dump_bytes / 1e6:.0f} MB per round")
    print(f"collect, flush after every batch: x{eager_ratio:.2f} of dense")
    print(f"collection / dense: x{ratio:.2f} (target >= {TARGET}; rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)  # DEJAVU_CPU_KERNELS, DEJAVU_HUGE_PAGES, ...: read at the command's edge
    main()
