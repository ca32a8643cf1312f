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


def ensure_checkpoint(path, log=print, gguf=None):
    """The converted checkpoint at `path`, converted if missing from the GGUF `gguf` (its (folder,
    file name); default: the embedded SmolLM2)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    folder, gguf_file = gguf or embedded_model()
    log(f"converting {gguf_file} into {path}")
    subprocess.run([sys.executable, "convert_llama_checkpoint.py", "--model-name", folder, "--gguf-file",
                    gguf_file, "--save-path", path], cwd=INFERENCE_DIR, check=True)
    return path


# Upstream DejaVu's MLP predictor on OPT-175B: rank 1000 for d = 12288 and an MLP of two d x 4d matrices.
UPSTREAM_PREDICTOR_SHARE = 1000 * (12288 + 4 * 12288) / (2 * 12288 * 4 * 12288)


def matched_rank(d, inner, multiple=1):
    """The predictor rank whose weights (d x D + D x I) are upstream's share of a gated MLP's
    three d x I matrices, rounded to a multiple of `multiple` (at least 8)."""
    return max(8, round(UPSTREAM_PREDICTOR_SHARE * 3 * d * inner / (d + inner) / multiple) * multiple)


def random_predictors(config, rank, seed=0, device=None, dtype=None):
    """{("mlp", layer): (predictor, "same")} for every layer: Linear(d, rank) -> Linear(rank, I),
    no biases, weights N(0, 1/fan_in). Speed only: what they keep means nothing."""
    import torch
    from torch import nn

    d, inner = config.hidden_size, config.intermediate_size
    generator = torch.Generator().manual_seed(seed)
    predictors = {}
    for layer in range(config.num_hidden_layers):
        predictor = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, inner, bias=False))
        with torch.no_grad():
            for linear in predictor:
                linear.weight.normal_(0.0, linear.in_features ** -0.5, generator=generator)
        predictors["mlp", layer] = (predictor.to(device=device, dtype=dtype).requires_grad_(False).eval(), "same")
    return predictors


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
