#!/usr/bin/env bash
# Train the mlp predictor of every layer of the dump in $DATA_PATH with main_mlp.py.
# Options and environment variables: see run_layers.sh. Works from any directory, e.g.
#     DATA_PATH=../data/<dump> ./run_c4_mlp.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_layers.sh" main_mlp.py mlp "$@"
