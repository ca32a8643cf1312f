"""Helpers for the pipeline tests (no tests here): launch ranks as subprocesses, read results."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import INFERENCE_DIR

RUNNER = os.path.join(INFERENCE_DIR, "dist_inference_runner.py")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_requests(path, requests):
    with open(path, "w", encoding="utf-8") as handle:
        for request in requests:
            handle.write((request if isinstance(request, str) else json.dumps(request)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def runner_args(checkpoint, model_type, requests, output, extra=()):
    return ["--model-name", str(checkpoint), "--model-type", model_type, "--infer-data", str(requests),
            "--output-path", str(output), "--device", "cpu", *extra]


class Pipeline:
    """All ranks of one pipeline as subprocesses on loopback; `stop()` kills leftovers."""

    def __init__(self, args, stages, log_dir, name="run"):
        self.port = free_port()
        self.procs, self.logs = [], []
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        for name_var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
            env.pop(name_var, None)
        for rank in range(stages):
            log_path = os.path.join(str(log_dir), f"{name}-rank{rank}.log")
            log = open(log_path, "w")
            self.logs.append(log_path)
            proc = subprocess.Popen(
                [sys.executable, RUNNER, *args, "--pipeline-group-size", str(stages), "--world-size",
                 str(stages), "--rank", str(rank), "--dist-url", f"tcp://127.0.0.1:{self.port}"],
                cwd=INFERENCE_DIR, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
            log.close()
            self.procs.append(proc)

    def log(self, rank):
        with open(self.logs[rank], encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait(self, timeout=180):
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
        return codes

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def kill(self, rank, sig=signal.SIGKILL):
        self.procs[rank].send_signal(sig)


def run_pipeline(args, stages, log_dir, name="run", timeout=180):
    pipeline = Pipeline(args, stages, log_dir, name)
    try:
        codes = pipeline.wait(timeout)
        if any(codes):
            logs = "\n".join(f"--- rank {r} ---\n{pipeline.log(r)[-3000:]}" for r in range(stages))
            raise AssertionError(f"pipeline exited {codes}:\n{logs}")
    finally:
        pipeline.stop()
    return pipeline


def run_in_process(args):
    """dist_inference_runner.main(args) in this process (one stage): its exit status."""
    from dejavu_llama import dist_inference_runner

    return dist_inference_runner.main(list(args))


def choice_token_ids(result, tokenizer):
    """Generated token ids of each choice, from the token strings (word-level tokenizer)."""
    out = []
    for choice in result["result"]["choices"]:
        tokens = choice["logprobs"]["tokens"]
        out.append(tokenizer.convert_tokens_to_ids(tokens))
    return out
