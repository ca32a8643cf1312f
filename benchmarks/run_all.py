"""Run every benchmark in benchmarks/ (bench_*.py), print one table, write JSON.

    .venv/bin/python benchmarks/run_all.py [--quick] [--threads 1] [--only engine,sparse_mlp]
    python benchmarks/run_all.py --device cuda        (the GPU benchmarks: bench_gpu.py)

Each benchmark runs in its own process (its memory and thread settings do not leak into the
next) with the same thread count, and writes its JSON into benchmarks/results/<name>.json;
this script collects them into benchmarks/results/run_all.json and one table. A benchmark
that fails is reported as failed and the others still run (exit status 1 at the end).

A benchmark takes part by being a file benchmarks/bench_<name>.py; the options it accepts
among --quick, --threads, --json/--output are passed on (found in its source). --threads is
the thread count of torch's ops and of the C decode kernels (cpu_kernels.set_num_threads): a
benchmark with the option sets both; without it, OMP_NUM_THREADS gives torch that count, and
the kernels take torch's count when they load. Its JSON gives
table rows under "rows" (dicts with case, measure, value, unit and optionally baseline,
baseline_value, ratio, target, met, note); bench_engine.py's own format is read as it is.
"""

import argparse
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time

from support import RESULTS, format_table, result_path

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["engine", "sparse_mlp", "memory"]  # the order; others follow alphabetically
GPU_BENCHMARKS = {"gpu"}  # run by --device cuda, and only by it
# For a benchmark without --quick: smaller settings of the options it has.
QUICK_FALLBACK = {"--new-tokens": "8", "--repeats": "2", "--prompt-tokens": "32"}


def discover():
    found = {os.path.basename(p)[len("bench_"):-len(".py")]: p for p in glob.glob(os.path.join(HERE, "bench_*.py"))}
    return sorted(found.items(), key=lambda item: (ORDER.index(item[0]) if item[0] in ORDER else len(ORDER), item[0]))


def options_of(path):
    with open(path) as handle:
        source = handle.read()
    return set(re.findall(r"""add_argument\(\s*["'](--[\w-]+)""", source))


def command_for(name, path, quick, threads, json_path):
    options = options_of(path)
    command = [sys.executable, path]
    if quick:
        if "--quick" in options:
            command.append("--quick")
        else:
            for option, value in QUICK_FALLBACK.items():
                if option in options:
                    command += [option, value]
    if "--threads" in options:
        command += ["--threads", str(threads)]
    for option in ("--json", "--output"):
        if option in options:
            command += [option, json_path]
            break
    return command


def run_benchmark(name, path, quick, threads, timeout):
    json_path = result_path(name)
    before = os.path.getmtime(json_path) if os.path.exists(json_path) else None
    command = command_for(name, path, quick, threads, json_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"== {name}: {' '.join(os.path.relpath(c) if c == path else c for c in command[1:])}", flush=True)
    started = time.perf_counter()
    lines = []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=os.path.dirname(HERE))
    try:
        deadline = started + timeout
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            print(f"   | {line}", end="", flush=True)
            if time.perf_counter() > deadline:
                raise subprocess.TimeoutExpired(command, timeout)
        returncode = process.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        returncode = "timeout"
    seconds = time.perf_counter() - started
    result = None
    if os.path.exists(json_path) and os.path.getmtime(json_path) != before:
        with open(json_path) as handle:
            result = json.load(handle)
    return dict(name=name, command=command, returncode=returncode, seconds=seconds, json=json_path if result else None,
                result=result, output_tail=lines[-40:])


def engine_rows(result):
    """Rows from bench_engine.py's JSON (engine vs transformers)."""
    case = f"{result.get('model', 'model')}, batch {result.get('batch')}, prompt {result.get('prompt_tokens')}, " \
           f"{result.get('new_tokens')} new, {result.get('threads')} thread(s)"
    rows = []
    for phase in ("decode", "prompt"):
        ours = result["engine"][f"{phase}_tokens_per_s"]
        theirs = result["transformers"][f"{phase}_tokens_per_s"]
        rows.append(dict(benchmark="engine", case=case, measure=f"engine {phase}", value=ours, unit="tok/s",
                         baseline="transformers", baseline_value=theirs, ratio=ours / theirs))
    if result.get("batch") == 1:
        rows[0].update(target=">= 1.5", met=rows[0]["ratio"] >= 1.5)
    if "same_greedy_tokens" in result:
        rows[0]["note"] = f"same greedy tokens as transformers: {result['same_greedy_tokens']}"
    dense = result["engine"]["decode_tokens_per_s"]
    for name, ratio in result.get("sparse_decode_vs_engine", {}).items():
        rows.append(dict(benchmark="engine", case=case, measure=f"{name} decode", unit="tok/s",
                         value=result[name]["decode_tokens_per_s"], baseline="engine decode", baseline_value=dense,
                         ratio=ratio, note="random predictors: speed only, the tokens mean nothing"))
    return rows


def rows_of(run):
    result = run["result"]
    if run["returncode"] != 0 or result is None:
        return [dict(benchmark=run["name"], case="", measure=f"FAILED (exit {run['returncode']})", value=None,
                     unit="", note=" / ".join(run["output_tail"][-3:]))]
    if isinstance(result.get("rows"), list):
        return [dict(r, benchmark=r.get("benchmark", run["name"])) for r in result["rows"]]
    if "engine" in result and "transformers" in result:
        return engine_rows(result)
    return [dict(benchmark=run["name"], case="", measure=key, value=value, unit="")
            for key, value in result.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of torch's ops and of the C decode kernels, for every benchmark "
                             "(default 1: see benchmarks/README.md)")
    parser.add_argument("--only", default="", help="comma-separated subset of the benchmark names")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: the CPU benchmarks; cuda: the GPU ones (%s)" % ", ".join(sorted(GPU_BENCHMARKS)))
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")

    benchmarks = [(name, path) for name, path in discover() if (name in GPU_BENCHMARKS) == (args.device == "cuda")]
    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = wanted - {name for name, _ in benchmarks}
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; "
                         f"found: {', '.join(name for name, _ in benchmarks)}")
        benchmarks = [(name, path) for name, path in benchmarks if name in wanted]
    os.makedirs(RESULTS, exist_ok=True)
    started = time.perf_counter()
    runs = [run_benchmark(name, path, args.quick, args.threads, args.timeout) for name, path in benchmarks]
    rows = [row for run in runs for row in rows_of(run)]
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    summary = dict(
        quick=args.quick, threads=args.threads, torch=torch_version, python=platform.python_version(),
        machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        started=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=time.perf_counter() - started,
        benchmarks={run["name"]: {k: v for k, v in run.items() if k != "name"} for run in runs}, rows=rows,
    )
    path = os.path.join(RESULTS, "run_all.json")
    with open(path, "w") as handle:
        json.dump(summary, handle, indent=2, default=str)
    print()
    timings = ", ".join("%s (%.0f s)" % (run["name"], run["seconds"]) for run in runs)
    print(f"benchmarks: {timings}; "
          f"threads {args.threads}; torch {torch_version}; {summary['machine']}, {os.cpu_count()} CPUs"
          f"{'; quick' if args.quick else ''}")
    print(format_table(rows))
    print(f"written to {os.path.relpath(path)} (and one JSON per benchmark beside it)")
    return 0 if all(run["returncode"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
