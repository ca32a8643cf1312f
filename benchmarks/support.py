"""What the benchmark scripts share: paths, the SmolLM2 checkpoint, result JSON and the table.

Not a benchmark itself (run_all.py runs the files named bench_*.py).
"""

import json
import os
import subprocess
import sys

from dejavu_common.helpers import EmbeddedModelMissing, embedded_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFERENCE_DIR = os.path.join(ROOT, "Decentralized_FM_alpha")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DEFAULT_CHECKPOINT = os.path.join(ROOT, "pretrained_models", "smollm2-135m-instruct")


def result_path(name):
    return os.path.join(RESULTS, f"bench_{name}.json")


def embedded_model():
    """(folder, GGUF file name) of the embedded SmolLM2, or exit with what to install."""
    try:
        return embedded_gguf()
    except EmbeddedModelMissing as error:
        sys.exit(str(error))


def ensure_checkpoint(path, log=print):
    """The converted SmolLM2 checkpoint at `path`, converted from the embedded GGUF if missing."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    log(f"converting SmolLM2 into {path}")
    folder, gguf_file = embedded_model()
    subprocess.run([sys.executable, "convert_llama_checkpoint.py", "--model-name", folder, "--gguf-file",
                    gguf_file, "--save-path", path], cwd=INFERENCE_DIR, check=True)
    return path


def write_json(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    print(f"written to {path}")


def number(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def format_table(rows):
    header = ["benchmark", "case", "measure", "value", "baseline", "ratio", "target", "met"]
    lines = []
    for r in rows:
        baseline = "" if r.get("baseline_value") is None else f"{number(r['baseline_value'])} ({r.get('baseline', '')})"
        value = "" if r.get("value") is None else f"{number(r['value'])} {r.get('unit', '')}".strip()
        lines.append([r.get("benchmark", ""), r.get("case", ""), r.get("measure", ""), value, baseline,
                      "" if r.get("ratio") is None else f"{r['ratio']:.3f}", r.get("target", ""),
                      {True: "yes", False: "NO"}.get(r.get("met"), "")])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines]
    notes = [f"  [{r.get('benchmark')}] {r.get('case')}: {r.get('measure')}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + (["notes:"] + notes if notes else []))
