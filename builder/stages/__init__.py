"""The stages after the source: filters, responses, rewards, pairs. Each module declares its stages once."""

import hashlib


def row_seed(seed: int, stage: str, row_uuid: str, sample_index: int) -> int:
    """A signed int64 seed per sample: the same row gets the same text whatever batch or process it lands in."""
    digest = hashlib.blake2b(f"{seed}/{stage}/{row_uuid}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
