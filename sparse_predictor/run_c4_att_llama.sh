#!/usr/bin/env bash
# Train the att predictor of every layer of the dump in $DATA_PATH with main_att_llama.py.
# Options and environment variables: see run_layers.sh. Works from any directory, e.g.
#     DATA_PATH=../data/<dump> ./run_c4_att_llama.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_layers.sh" main_att_llama.py att "$@"
