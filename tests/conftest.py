"""Test set-up: offline, deterministic, nothing reaches any address but loopback.

The tiny models are built once per machine into a cache folder (MAGPIE_BUILDER_CACHE, default .cache/ in the
checkout) and reused by every test; Hugging Face caches go to a temporary folder.
"""

import os
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MAGPIE_BUILDER_CACHE", str(ROOT / ".cache" / "magpie_builder"))
_HF_HOME = tempfile.mkdtemp(prefix="magpie-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = str(Path(_HF_HOME) / "datasets")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("HF_TOKEN", None)

# The Hub for every test is a Hub-compatible server on 127.0.0.1, started before huggingface_hub and datasets
# read HF_ENDPOINT at import: nothing can reach any other address.
from hub_server import HubServer  # noqa: E402


HUB_TOKENS = {"hf_test_alice_0123456789": "alice", "hf_test_bob_9876543210": "bob"}
HUB = HubServer(Path(tempfile.mkdtemp(prefix="magpie-test-hub-")), HUB_TOKENS).__enter__()
os.environ["HF_ENDPOINT"] = HUB.url

import pytest  # noqa: E402

from builder.config import BuildConfig  # noqa: E402
from builder.testing.tiny import resolve_model_path  # noqa: E402


FAMILIES = ["llama-3", "llama-3.1", "qwen2.5", "gemma-2", "phi-3.5", "mistral"]


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model("chat-llama-3")` -> the local folder of a tiny model, built on first use."""
    return lambda name: resolve_model_path(f"tiny:{name}")


def small_config(**overrides) -> BuildConfig:
    """A fast build on tiny models; any field can be overridden."""
    values = dict(
        generator_model="tiny:chat-llama-3.1",
        reward_model="tiny:reward-armo",
        reward_trust_remote_code=True,
        num_instructions=24,
        max_instruction_tokens=64,
        num_responses=4,
        max_response_tokens=32,
        shard_size=8,
        generation_batch_size=8,
        reward_batch_size=8,
        test_size=0.1,
        seed=7,
        resume=False,  # every test computes its rows; the resume tests turn it on with their own cache folder
    )
    values.update(overrides)
    return BuildConfig(**values)


@pytest.fixture
def make_config():
    return small_config


@pytest.fixture
def hub(monkeypatch):
    """The test Hub, emptied, with Alice logged in through HF_TOKEN."""
    HUB.recover()
    HUB.state.repos.clear()
    HUB.state.requests.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_test_alice_0123456789")
    yield HUB
    HUB.recover()


def free_port() -> int:
    """A loopback port nothing listens on now, for a launcher's rendezvous: a fixed one (accelerate's default 29500)
    can still be held by an earlier run's process."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def close(a, b, tolerance: float = 1e-5) -> bool:
    """Equal, floats within `tolerance`: reward scores shift in the 7th digit with the shape of the padded batch
    they ran in. Texts, ids and choices must match exactly."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tolerance
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tolerance) for k in a)
    return a == b


def same_rows(a, b) -> bool:
    """Two DatasetDicts hold the same rows in the same order."""
    return a.keys() == b.keys() and all(close(a[n].to_list(), b[n].to_list()) for n in a)
