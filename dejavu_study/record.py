"""One line of a study's perplexity log: what a run was and the perplexity its results file holds.

    python -m dejavu_study.record LOG RESULTS [KEY=VALUE ...] [--stats FILE]

The study scripts (demo.sh, frontier.sh, scaling.sh, controls.sh) call this after each runner
run. It appends one JSON line to LOG: the KEY=VALUE pairs ("-" is null; kept fractions and label
k are numbers, train_rows an integer, every other value a string), the perplexity and token count
of RESULTS (task_datasets.perplexity) and `result_file`. With --stats (the runner's
--sparse-stats file, where it exists) the line also gets the kept fraction reached on this text
(`reached_keep`) and the MLP bytes per token relative to dense (`mlp_bytes_relative`).

The line is written with one append, so runs in parallel may share a log.

Exit status: 0 written; 1 the results or stats file cannot be read; 2 a malformed KEY=VALUE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FLOAT_KEYS = ("keep", "mlp_keep", "att_keep", "label_k")
INT_KEYS = ("train_rows",)


class RecordError(ValueError):
    pass


def parse_pairs(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> typed values ("-" -> None); a pair without "=" or a number that is not
    one is a RecordError naming it."""
    line = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RecordError(f"{pair!r}: expected KEY=VALUE")
        if value == "-":
            line[key] = None
            continue
        try:
            line[key] = float(value) if key in FLOAT_KEYS else int(value) if key in INT_KEYS else value
        except ValueError:
            raise RecordError(f"{pair!r}: {key} must be a number") from None
    return line


def record_line(results: str, fields: dict, stats: str | None = None) -> dict:
    """`fields` (parse_pairs) with the perplexity of `results` and, with `stats`, what it measured."""
    from dejavu_llama.task_datasets.perplexity import perplexity_of_file

    line = dict(fields)
    try:
        figures = perplexity_of_file(results)
    except (OSError, ValueError) as error:
        raise RecordError(f"{results}: cannot read the perplexity ({error})") from None
    if figures is None:
        raise RecordError(f"{results}: no result holds token log-probabilities")
    line.update(figures, result_file=results)
    if stats and os.path.isfile(stats):
        try:
            with open(stats, encoding="utf-8") as handle:
                measured = json.load(handle)
        except (OSError, ValueError) as error:
            raise RecordError(f"{stats}: cannot read the sparse stats ({error})") from None
        line.update(reached_keep=measured.get("mean_kept"), mlp_bytes_relative=measured.get("bytes_relative"),
                    sparse_stats=stats)
    return line


def append_line(log_path: str, line: dict) -> None:
    text = json.dumps(line) + "\n"
    with open(log_path, "a", encoding="utf-8") as handle:  # one write: parallel runs may share the log
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="the JSONL log a line is appended to")
    p.add_argument("results", help="the runner's results file (--output-path)")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--stats", default=None, help="the runner's --sparse-stats file (ignored where absent)")
    args = p.parse_args(argv)
    try:
        fields = parse_pairs(args.pairs)
    except RecordError as error:
        p.error(str(error))
    try:
        line = record_line(args.results, fields, args.stats)
    except RecordError as error:
        print(f"record: error: {error}", file=sys.stderr)
        return 1
    append_line(args.log, line)
    what = " ".join(f"{k}={v}" for k, v in line.items() if k in ("mode", "mlp_keep", "att_keep", "keep", "model",
                                                                 "train_rows", "label_k", "predictors"))
    print(f"perplexity {what}: {line['perplexity']:.4f} over {line['tokens']} tokens"
          + (" (allocated)" if line.get("allocation") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
