"""The study's tools: the report (report/) and residual-stream drift (drift.py) over study runs."""
