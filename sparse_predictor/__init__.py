"""Sparse predictors (DejaVu) for OPT and Llama: dump reader, labels, training, metrics.

The sparse-execution code only needs `load_predictor` / `checkpoint_path` from
`sparse_predictor.predictor` (which imports nothing but torch).
"""
