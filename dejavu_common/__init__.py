"""What the engine (dejavu_llama), the predictor package (sparse_predictor) and the study tools
(dejavu_study) share: helpers.py (kept counts, layer specs, device, atomic writes, the embedded
model) and dump_format.py (the activation-dump format)."""
