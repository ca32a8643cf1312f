"""Perplexity of a result file: exp(-mean log-probability of the echoed tokens).

As upstream: for every result, the `token_logprobs` of its first choice without the first
entry (the first token has no prefix: null), pooled over all results (a token-weighted
mean, not a mean of per-document perplexities). Error results and results without logprobs
are skipped and counted.

    python -m dejavu_llama.task_datasets.perplexity RESULT_FILE [--json]
"""

import argparse
import json
import math
import sys


def perplexity_of_results(results):
    """{"perplexity", "tokens", "documents", "skipped"} or None when no result has logprobs."""
    total, tokens, documents, skipped = 0.0, 0, 0, 0
    for result in results:
        try:
            logprobs = result["result"]["choices"][0]["logprobs"]["token_logprobs"]
        except (KeyError, IndexError, TypeError):
            skipped += 1
            continue
        values = [v for v in logprobs[1:] if v is not None]
        if not values:
            skipped += 1
            continue
        total += sum(values)
        tokens += len(values)
        documents += 1
    if tokens == 0:
        return None
    return {"perplexity": math.exp(-total / tokens), "tokens": tokens, "documents": documents, "skipped": skipped}


def read_results(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def perplexity_of_file(path):
    return perplexity_of_results(read_results(path))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Perplexity of echoed prompts in a result file")
    parser.add_argument("result_file")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        figures = perplexity_of_file(args.result_file)
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: cannot read {args.result_file}: {error}", file=sys.stderr)
        return 1
    if figures is None:
        print(f"error: {args.result_file} has no echoed token logprobs (requests need echo: true, "
              "logprobs >= 0)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(figures))
    else:
        note = f", {figures['skipped']} result(s) skipped" if figures["skipped"] else ""
        print(f"perplexity {figures['perplexity']:.4f} over {figures['tokens']} tokens in "
              f"{figures['documents']} document(s){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
