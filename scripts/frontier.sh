#!/usr/bin/env bash
# The frontier in full: demo.sh's study on every kept fraction from 0.95 to 0.1, uniform and
# allocated per layer, each configuration's decode speed against dense, and the whole downstream
# task (1,200 items) for dense and the configurations the Answer picks.
#
#   bash scripts/frontier.sh                       # runs/frontier-<name>, reports/frontier-<name>
#   REUSE=1 bash scripts/frontier.sh               # keep the dump and predictors of an earlier run
#
# Every variable of demo.sh can be set in the environment; these are the ones this study changes.
set -euo pipefail
export STUDY="${STUDY:-frontier}"
export KEEP_FRACTIONS="${KEEP_FRACTIONS:-0.95 0.9 0.8 0.7 0.6 0.5 0.4 0.25 0.1}"
export ALLOCATION_GRID="${ALLOCATION_GRID:-1 $KEEP_FRACTIONS}"
export ATT_KEEP_FRACTIONS="${ATT_KEEP_FRACTIONS:-0.75 0.5}"
export DOWNSTREAM_ITEMS="${DOWNSTREAM_ITEMS-}"  # empty: all of the task's items
export ALLOCATE_METHODS="${ALLOCATE_METHODS:-predicted teal cats}"
export DECODE_KINDS="${DECODE_KINDS:-kernel bound masks}"
export DECODE_MAX_CHANGE="${DECODE_MAX_CHANGE-}"   # empty: every configuration timed
export VAL_DOCS="${VAL_DOCS:-20}"
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/demo.sh"
