"""The pipeline core: a stage's declaration, the runner, keys, resume, ranks and the ledger."""
