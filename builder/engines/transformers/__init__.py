"""The transformers engine: sampling, the KV caches and continuous batching (`generation.py`), reward scoring
(`scoring.py`), and CPU kernels (`cpu/`)."""
