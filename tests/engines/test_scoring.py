"""Reward scoring in the transformers engine: length-sorted batches and the shared prefix of a row's N inputs."""

import pytest

from builder.engines.transformers import scoring
from builder.models import ModelSpec, load_reward_model


ARMO = ModelSpec("tiny:reward-armo", trust_remote_code=True)


def test_padding_never_moves_the_read_position():
    # Sequences that end with the pad id (EOS used as pad) only share a batch with sequences of their length.
    token_ids = [[1, 2, 9], [1, 9], [1, 2, 3, 4], [5, 9], [1, 2]]
    batches = scoring.reward_batches(token_ids, pad_token_id=9, batch_size=8)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    for batch in batches:
        if any(token_ids[i][-1] == 9 for i in batch):
            assert len({len(token_ids[i]) for i in batch}) == 1


def test_shared_prefix_scoring_equals_whole_sequence_scoring(monkeypatch):
    model, tokenizer = load_reward_model(ModelSpec("tiny:reward"))
    assert scoring.shares_prefix(model)
    roots = []
    shared_prefix = scoring.shared_prefix
    monkeypatch.setattr(scoring, "shared_prefix", lambda *a, **k: roots.append(shared_prefix(*a, **k)) or roots[-1])

    def prompt(text):
        # Every prompt starts with the same system block: that root prefix runs once for all groups.
        return tokenizer(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
            f"<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            add_special_tokens=False,
        ).input_ids

    def answers(ids, texts):
        return [ids + tokenizer(text + "<|eot_id|>", add_special_tokens=False).input_ids for text in texts]

    # Prefixes of different lengths and suffixes of different lengths, mixed across groups in batches of 3.
    groups = [
        answers(
            prompt("Write a poem about the sea and the sky"),
            ("Waves.", "The sea is wide and the sky is blue.", "No", "Blue, blue, blue"),
        ),
        answers(prompt("Hi"), ("Hello there, how can I help you today?", "Hey", "Hi!")),
    ]
    whole = [scoring.score_sequences(model, group, tokenizer.pad_token_id, batch_size=1) for group in groups]
    shared = scoring.score_with_shared_prefixes(model, groups, tokenizer.pad_token_id, batch_size=3)
    assert [len(s) for s in shared] == [4, 3]
    assert roots[0] is not None and roots[0].length >= scoring.MIN_SHARED_PREFIX
    for got, expected in zip(shared, whole):
        assert got == pytest.approx(expected, abs=1e-4)
    assert len({round(v, 4) for v in whole[0] + whole[1]}) == 7  # the scores differ, so a mix-up would show
    assert scoring.score_groups(model, [groups[0], groups[0][:2]], tokenizer.pad_token_id, 8) == [
        pytest.approx(whole[0], abs=1e-4),
        pytest.approx(whole[0][:2], abs=1e-4),
    ]
    armo, _ = load_reward_model(ARMO)
    assert not scoring.shares_prefix(armo)  # custom code reads its gating features off the whole input
