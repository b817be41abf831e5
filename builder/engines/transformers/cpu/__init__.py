"""CPU kernels of the transformers engine: oneDNN linears (`gemm.py`) and decode attention in C (`attention.py`)."""
