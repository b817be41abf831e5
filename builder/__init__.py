"""magpie-builder: Magpie preference (DPO) datasets from an aligned chat model and a reward model."""

__version__ = "0.1.0"
