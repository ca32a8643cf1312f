"""One pipeline rank of DejaVu inference (upstream's entry point and flags).

Start one process per pipeline stage, either with torchrun (env://: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) or with upstream's explicit `--rank R --dist-url tcp://HOST:PORT`.
Stage s holds layers [s * num_layers, (s + 1) * num_layers); stage 0 also the embeddings,
the last stage also the head.

Who does what:
* rank 0 reads, validates and tokenizes the request file (`--infer-data`) and shares the
  batch plan with every rank, so all stages run the same micro-batches, in the same order,
  with the same masks (the save variant relies on it), and only rank 0 needs the file;
* the last stage chooses tokens, builds the results and writes `--output-path` atomically
  (temporary file + os.replace) in request order; it logs the perplexity of echoed prompts.

Errors (bad flags, a layer-count mismatch, a bad request line, a lost peer) are raised,
caught here once, logged as one message and turned into exit status 1. A mismatch between
--num-layers x --pipeline-group-size, --max-layers and the checkpoint's layer count is found
before any weight is loaded.

--dtype float32|bfloat16|float16 sets the weights' dtype. On CPU the decode kernels read
half-precision weights as they are (activations, KV caches and sums stay float32) and the prompt
runs in torch ops in that dtype. --fp16 is upstream's float16 on CUDA; on CPU it is ignored with
a warning (float32) unless --dtype asks for half precision.

Model-type variants (save, sparse) plug in through the registry's hooks: their
`add_arguments(parser)` adds flags before the final parse, `settings_from_args(args, environ)`
turns them (and upstream's environment names) into the variant's settings (`args.variant_settings`,
e.g. a SparseConfig, saved beside the results as `<output>.sparse_config.json`), and
`prepare_stage(blocks, args, config)` runs once per rank after its blocks are built; its
`close(ok)` runs at the end.
"""

import argparse
import json
import logging
import os
import sys
import time

from dejavu_common.helpers import DEVICE_CHOICES, resolve_device as device_kind
from dejavu_llama.modules.decode import BACKEND_CHOICES

LOG_FORMAT = "%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"
PP_MODES = ("pipe_sync_sample_mask_token_pipe", "pipe_sync_greedy_mask_token_pipe")

logger = logging.getLogger("dist_inference_runner")


class SetupError(ValueError):
    """Flags, checkpoint or environment that cannot run; found before loading weights."""


class AgreedFailure(RuntimeError):
    """A failure every rank learned together (a bad request file): no peer is to blame."""


def configure_logging(rank):
    root = logging.getLogger()
    formatter = logging.Formatter(LOG_FORMAT.format(rank=rank))
    for handler in root.handlers:
        if getattr(handler, "_dejavu", False):
            handler.setFormatter(formatter)
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._dejavu = True
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model-name", required=True, help="converted checkpoint folder (also holds the tokenizer)")
    add("--model-type", default="llama", help="registry name: opt, llama, and variants (opt-save, ...)")
    add("--num-layers", type=int, default=None, help="layers per stage (default: max-layers / stages)")
    add("--max-layers", type=int, default=None, help="layers in all (default and required: the checkpoint's)")
    add("--pipeline-group-size", type=int, default=None, help="number of stages (default: world size)")
    add("--world-size", type=int, default=None, help="ranks in all (default: torchrun's, else stages)")
    add("--data-group-size", type=int, default=1, help="data-parallel groups (only 1 is supported)")
    add("--rank", type=int, default=None, help="this rank (default: $RANK or 0)")
    add("--cuda-id", type=int, default=None, help="GPU index (default: $LOCAL_RANK or 0)")
    add("--dist-url", default=None, help="tcp://HOST:PORT of rank 0 (default: env:// under torchrun, "
                                         "else tcp://127.0.0.1:9000)")
    add("--dist-backend", default="auto", choices=("auto", "nccl", "gloo", "cupy_nccl"),
        help="auto: nccl on CUDA, gloo on CPU; cupy_nccl needs cupy")
    add("--device", default="auto", choices=DEVICE_CHOICES)
    add("--pp-mode", default="pipe_sync_sample_mask_token_pipe", choices=PP_MODES,
        help="upstream's engine name; both names run the same engine (greedy is temperature 0)")
    add("--infer-data", required=True, help="request file (JSON lines)")
    add("--output-path", default=None, help="result file (default: output_<request file name> beside it)")
    add("--fp16", action="store_true", help="float16 on CUDA; ignored with a warning on CPU (see --dtype)")
    add("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
        help="the weights' dtype (default float32; float16 with --fp16 on CUDA); on CPU the decode kernels "
             "read bfloat16 and float16 weights, with float32 activations and caches")
    add("--batch-size", type=int, default=8, help="rows (completions) per batch")
    add("--token-micro-batch-size", type=int, default=1,
        help="rows per micro-batch in the token phase (and the prompt phase unless --micro-batch-size)")
    add("--micro-batch-size", type=int, default=None, help="rows per micro-batch (default: token micro-batch size)")
    add("--input-seq-length", type=int, default=None,
        help="keep at most this many prompt tokens (the last ones, upstream's left truncation)")
    add("--generate-seq-length", type=int, default=None, help="max_tokens of requests that give none")
    add("--budget", type=int, default=None, help="cap on rows x (prompt + generated tokens) per batch")
    add("--num-iters", type=int, default=None, help="stop after this many batches (default: all)")
    add("--seed", type=int, default=42)
    add("--skip-bad-requests", action="store_true",
        help="write an error result for a bad request line instead of failing")
    add("--ignore-eos", action="store_true", help="do not stop a completion at the end-of-sequence token")
    add("--comm-timeout", type=float, default=60.0,
        help="seconds without a heartbeat before a peer is declared lost")
    add("--op-timeout", type=float, default=1800.0, help="seconds one transfer may wait")
    add("--num-threads", type=int, default=None, help="CPU threads of torch's ops and of the C decode kernels")
    add("--decode-backend", default="auto", choices=BACKEND_CHOICES,
        help="how a stage runs its blocks (modules/decode): auto is cuda on a GPU (static KV cache, one CUDA "
             "graph per decoding step), cpu on the CPU (C decode kernels); torch is the reference")
    add("--profiling", default="no-profiling", choices=("no-profiling", "tidy_profiling"),
        help="tidy_profiling: write a Chrome trace of each stage's compute/send/recv")
    add("--trace-postfix", default="default")
    add("--trace-dir", default="trace_json")
    add("--log-level", default="INFO")
    return parser


def parse_arguments(argv, environ=None):
    """Parse in two steps so the model type's own flags (variant hooks) are known; the variant's
    settings (e.g. a SparseConfig) are made here, from its flags and the environment `environ`
    (default: this process's): the one place the run reads upstream's environment names."""
    from dejavu_llama.pipeline_parallel.model_registry import variant_hooks

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model-type", default="llama")
    known, _ = pre.parse_known_args(argv)
    hooks = variant_hooks(known.model_type)  # unknown type: error here
    parser = build_parser()
    if hooks.add_arguments is not None:
        hooks.add_arguments(parser)
    args = parser.parse_args(argv)
    args.prepare_stage = hooks.prepare_stage
    args.variant_settings = None
    if hooks.settings_from_args is not None:
        args.variant_settings = hooks.settings_from_args(args, os.environ if environ is None else environ)
    return args


def read_checkpoint_config(model_path):
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise SetupError(f"--model-name {model_path}: no config.json (is it a converted checkpoint folder?)")
    with open(config_file) as handle:
        return json.load(handle)


def resolve_layout(args, config):
    """Ranks, stages and layers per stage; checks them against the checkpoint (no weights yet)."""
    env_world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ and args.dist_url in (None, "env://") else None
    if args.data_group_size != 1:
        raise SetupError("--data-group-size > 1 (data parallelism) is not supported; run one pipeline per job")
    stages = args.pipeline_group_size or args.world_size or env_world or 1
    world = args.world_size or env_world or stages * args.data_group_size
    if env_world is not None and world != env_world:
        raise SetupError(f"--world-size {world} does not match torchrun's WORLD_SIZE {env_world}")
    if world != stages * args.data_group_size:
        raise SetupError(f"--world-size {world} != --pipeline-group-size {stages} x --data-group-size "
                         f"{args.data_group_size}")
    total = config.get("num_hidden_layers")
    if not isinstance(total, int):
        raise SetupError(f"{args.model_name}/config.json has no num_hidden_layers")
    max_layers = args.max_layers if args.max_layers is not None else total
    if max_layers != total:
        raise SetupError(f"--max-layers {max_layers} does not match the checkpoint's {total} layers "
                         f"(num_hidden_layers in {args.model_name}/config.json)")
    if args.num_layers is None:
        if max_layers % stages:
            raise SetupError(f"{max_layers} layers cannot be split evenly over {stages} stages; "
                             "pass --num-layers explicitly")
        num_layers = max_layers // stages
    else:
        num_layers = args.num_layers
    if num_layers * stages != max_layers:
        raise SetupError(f"--num-layers {num_layers} x --pipeline-group-size {stages} = {num_layers * stages} "
                         f"layers, but the model has {max_layers} (--max-layers / the checkpoint)")
    args.world_size, args.pipeline_group_size, args.num_layers, args.max_layers = world, stages, num_layers, max_layers
    return world, stages, num_layers


def resolve_device(args):
    import torch

    cuda_id = args.cuda_id if args.cuda_id is not None else int(os.environ.get("LOCAL_RANK", 0))
    try:
        kind = device_kind(args.device)
    except ValueError as error:
        raise SetupError(str(error)) from None
    if kind == "cuda":
        torch.cuda.set_device(cuda_id)
        device = torch.device("cuda", cuda_id)
    else:
        device = torch.device("cpu")
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
        if args.fp16 and dtype != torch.float16:
            raise SetupError(f"--fp16 and --dtype {args.dtype} disagree: give one")
    elif args.fp16 and device.type == "cuda":
        dtype = torch.float16
    else:
        if args.fp16:
            logger.warning("--fp16 ignored on CPU: running float32 (--dtype float16 or bfloat16 runs half precision)")
        dtype = torch.float32
    return device, dtype


def resolve_rendezvous(args):
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if args.dist_url in (None, "env://") and torchrun:
        return "env://", int(os.environ["RANK"])
    url = args.dist_url or "tcp://127.0.0.1:9000"
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    return url, rank


def eos_ids_of(config, tokenizer):
    ids = set()
    for value in (config.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def make_plan(args, config, stages):
    """Rank 0: validated, tokenized requests and the batch plan (or the error all ranks report)."""
    from transformers import AutoTokenizer

    from dejavu_llama.task_datasets.inference_data import RequestError, load_requests, make_batches

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        max_positions = config.get("max_position_embeddings") or 2048
        entries = load_requests(
            args.infer_data, tokenizer, max_positions, skip_bad=args.skip_bad_requests,
            input_seq_length=args.input_seq_length, default_max_tokens=args.generate_seq_length,
        )
        batches = make_batches(entries, args.batch_size, args.budget)
        if args.num_iters is not None:
            batches = batches[: args.num_iters]
        return {"entries": entries, "batches": batches}
    except (RequestError, OSError) as error:
        return {"error": str(error)}


def row_settings_of(entry):
    return {"temperature": entry.temperature, "top_p": entry.top_p, "top_k": entry.top_k,
            "logprobs": entry.logprobs, "echo": entry.echo}


def load_stage(args, stage, stages, device, dtype):
    from dejavu_llama.pipeline_parallel.model_registry import load_model_module

    parts = load_model_module(args.model_type)
    first_layer = stage * args.num_layers
    layers = range(first_layer, first_layer + args.num_layers)
    logger.info("stage %d of %d: loading layers %d-%d%s%s", stage, stages, layers[0], layers[-1],
                " + embeddings" if stage == 0 else "", " + head" if stage == stages - 1 else "")
    embeddings = parts.GPTEmbeddings.from_pretrained(args.model_name, dtype=dtype, device=device) if stage == 0 else None
    blocks = [
        parts.GPTBlock.from_pretrained(args.model_name, layer_index=i, dtype=dtype, device=device) for i in layers
    ]
    head = parts.GPTLMHead.from_pretrained(args.model_name, dtype=dtype, device=device) if stage == stages - 1 else None
    return embeddings, blocks, head


def run(args, comm, rank, stages, config, device, dtype, state):
    import torch

    from dejavu_llama.pipeline_parallel.dist_pipeline_inference_mask_greedy_token_pipe_sync import (
        DistInferenceMaskTokenPipeSync,
        Profiler,
    )

    stage, is_last = rank, rank == stages - 1
    plan = make_plan(args, config, stages) if rank == 0 else None
    plan = comm.broadcast_object(plan, src=0)
    if "error" in plan:
        comm.finish()
        raise AgreedFailure(plan["error"] if rank == 0 else f"rank 0 rejected the requests: {plan['error']}")
    entries, batches = plan["entries"], plan["batches"]
    torch.manual_seed(args.seed)

    embeddings, blocks, head = load_stage(args, stage, stages, device, dtype)
    if args.prepare_stage is not None:
        hook = args.prepare_stage(blocks, args, blocks[0].config)
        if hook is not None:
            state["hook"] = hook
    profiler = Profiler(args.profiling == "tidy_profiling", rank, device)
    engine = DistInferenceMaskTokenPipeSync(
        comm, stage, stages, embeddings, blocks, head, hidden_size=config["hidden_size"], device=device,
        dtype=dtype, micro_batch_size=args.micro_batch_size or args.token_micro_batch_size, seed=args.seed,
        profiler=profiler, decode_backend=args.decode_backend,
    )

    outputs = {}
    progress = None
    if is_last:
        from tqdm import tqdm

        progress = tqdm(total=len(entries), desc="requests", unit="req", file=sys.stderr,
                        mininterval=1.0 if sys.stderr.isatty() else 10.0)
    started = time.perf_counter()
    prompt_tokens = generated_tokens = 0
    for batch in batches:
        settings = [row_settings_of(entries[row.entry]) for row in batch.rows] if is_last else None
        results = engine.inference_batch(batch.prompts, batch.max_new_tokens, settings)
        prompt_tokens += sum(len(p) for p in batch.prompts)
        generated_tokens += batch.max_new_tokens * len(batch.rows)
        if is_last:
            for row, output in zip(batch.rows, results):
                outputs.setdefault(row.entry, []).append(output)
            progress.update(len({row.entry for row in batch.rows}))
    elapsed = time.perf_counter() - started
    if progress is not None:
        progress.close()
    logger.info("stage %d: %d batch(es), %d prompt tokens, %d generated row-tokens in %.2f s",
                stage, len(batches), prompt_tokens, generated_tokens, elapsed)
    if is_last:
        write_results(args, config, entries, batches, outputs)
    trace = profiler.write(os.path.join(args.trace_dir, f"inference_rank{rank}_{args.trace_postfix}.json"))
    if trace:
        logger.info("trace written to %s", trace)


def write_results(args, config, entries, batches, outputs):
    from transformers import AutoTokenizer

    from dejavu_common.helpers import write_jsonl_atomic
    from dejavu_llama.task_datasets.inference_data import TokenText, build_result, default_output_path
    from dejavu_llama.task_datasets.perplexity import perplexity_of_results

    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    token_text = TokenText(tokenizer)
    eos_ids = set() if args.ignore_eos else eos_ids_of(config, tokenizer)
    last_entry = max((row.entry for batch in batches for row in batch.rows), default=-1)
    if args.num_iters is None:
        last_entry = len(entries) - 1
    elif last_entry < len(entries) - 1:
        logger.warning("--num-iters %d: results for the first %d of %d requests", args.num_iters,
                       last_entry + 1, len(entries))
    results = [build_result(entry, outputs.get(entry.index, []), token_text, eos_ids)
               for entry in entries[: last_entry + 1]]
    path = args.output_path or default_output_path(args.infer_data)
    save_beside = getattr(args.variant_settings, "save_beside", None)
    if save_beside is not None:  # e.g. the SparseConfig, beside the results it produced
        save_beside(path)
    write_jsonl_atomic(path, results)
    errors = sum(1 for r in results if "error" in r)
    logger.info("wrote %d result(s) to %s%s", len(results), path, f" ({errors} error result(s))" if errors else "")
    ppl = perplexity_of_results(results)
    if ppl is not None:
        logger.info("perplexity of echoed prompts: %.4f over %d tokens", ppl["perplexity"], ppl["tokens"])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(os.environ.get("RANK", "?"))
    comm = cleanup = None
    state = {}
    try:
        args = parse_arguments(argv)
        logging.getLogger().setLevel(args.log_level.upper())
        from dejavu_llama.modules.decode.environment import apply_environment

        apply_environment(os.environ)
        url, rank = resolve_rendezvous(args)
        configure_logging(rank)
        if args.num_threads:
            import torch

            from dejavu_llama.modules import cpu_kernels

            torch.set_num_threads(args.num_threads)
            cpu_kernels.set_num_threads(args.num_threads)  # (default: torch's count when they load)
        config = read_checkpoint_config(args.model_name)
        world, stages, _ = resolve_layout(args, config)
        if not 0 <= rank < world:
            raise SetupError(f"--rank {rank} is outside the world of {world} rank(s)")
        device, dtype = resolve_device(args)

        from dejavu_llama.comm.comm_utils import init_communicator, register_emergency_cleanup

        cleanup = lambda: close_hook(state, ok=False)  # noqa: E731
        register_emergency_cleanup(cleanup)
        comm, rank, world = init_communicator(
            url if world > 1 else None, rank, world, args.dist_backend, device,
            comm_timeout=args.comm_timeout, op_timeout=args.op_timeout, environ=os.environ,
        )
        args.rank = rank  # variant hooks read it (torchrun gives no --rank)
        run(args, comm, rank, stages, config, device, dtype, state)
        close_hook(state, ok=True)
        comm.finish()
        return 0
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the one place errors become an exit status
        return report_failure(error, comm, state)
    finally:
        if cleanup is not None:
            from dejavu_llama.comm.comm_utils import unregister_emergency_cleanup

            unregister_emergency_cleanup(cleanup)


def close_hook(state, ok):
    hook = state.pop("hook", None)
    if hook is not None:
        hook.close(ok)


def report_failure(error, comm, state):
    from dejavu_llama.comm.comm_utils import CommError, claim_exit, release_exit

    if not claim_exit():  # the watchdog is already ending the process
        time.sleep(60)
        return 1
    try:
        return _report_failure(error, comm, state, CommError)
    finally:
        release_exit()


# Errors whose message says it all: logged as one line, without a traceback (matched by name,
# so the runner imports none of the modules that raise them before it needs them).
EXPECTED_ERRORS = ("RequestError", "UnknownModelType", "CheckpointError", "SparseSetupError", "DumpError")


def _report_failure(error, comm, state, CommError):
    expected = isinstance(error, (CommError, AgreedFailure, SetupError)) or type(error).__name__ in EXPECTED_ERRORS
    if isinstance(error, KeyboardInterrupt):
        message = "interrupted"
    elif expected:
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
        logger.debug("traceback", exc_info=error)
    if comm is not None and not isinstance(error, AgreedFailure):
        message = comm.abort(message)
    logger.error("%s", message)
    if not expected and not isinstance(error, KeyboardInterrupt):
        logger.error("traceback of the failure:", exc_info=error)
    try:
        close_hook(state, ok=False)
    except Exception:
        logger.exception("closing the stage hook failed")
    if comm is not None:
        comm.close()
    return 1


def script_main():
    """The command line (also the `dejavu-infer` console command)."""
    status = main()
    # Leave without the interpreter's teardown: every file is closed and the process group is
    # gone; tearing down torch's (and NCCL's) threads only costs time and can hang.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    script_main()
