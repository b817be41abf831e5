"""The GPU path, checked on the CPU: each worker's own GPUs, refusals of what cannot fit, engines released before the
reward model loads."""

import os

import pytest

from builder import devices

from conftest import small_config


@pytest.mark.parametrize(
    "visible, worker, workers, per_worker, block",
    [
        ("0,1,2,3,4,5,6,7", 0, 1, 8, ["0", "1", "2", "3", "4", "5", "6", "7"]),
        ("0,1,2,3,4,5,6,7", 3, 8, 1, ["3"]),
        ("0,1,2,3,4,5,6,7", 1, 2, 4, ["4", "5", "6", "7"]),
        ("4,5,6,7", 1, 2, 2, ["6", "7"]),  # SLURM gave this job GPUs 4-7: worker 1 takes the second pair of them
        ("GPU-aa,GPU-bb", 1, 2, 1, ["GPU-bb"]),
    ],
)
def test_each_worker_takes_its_own_block_of_the_visible_gpus(monkeypatch, visible, worker, workers, per_worker, block):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert devices.gpu_block(worker, workers, per_worker, devices.visible_gpus()) == block


def test_more_gpus_than_visible_is_refused_with_what_fits(monkeypatch):
    with pytest.raises(devices.GPUAssignmentError, match=r"2 worker\(s\) x tensor_parallel_size 8 = 16 GPUs, but 8"):
        devices.gpu_block(0, 2, 8, [str(i) for i in range(8)])
    with pytest.raises(devices.GPUAssignmentError, match="tensor_parallel_size <= 4"):
        devices.gpu_block(0, 1, 8, ["0", "1", "2", "3"])


def test_claiming_overwrites_what_the_scheduler_set_and_makes_vllm_spawn(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,6,7")
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert devices.claim_gpus(rank=1, num_proc=2, per_worker=2) == ["6", "7"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7" and os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    # Under accelerate launch the local rank picks the block, whatever num_proc says.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert devices.claim_gpus(rank=None, num_proc=1, per_worker=1) == ["2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(devices.GPUAssignmentError):
        devices.claim_gpus(rank=None, num_proc=1, per_worker=2)  # 4 local ranks x 2 GPUs on 4 GPUs


def test_no_visible_gpu_claims_nothing(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.visible_gpus() == [] and devices.claim_gpus(0, 1, 1) == []


def test_armorm_loads_without_remote_code_and_scores_as_its_published_computation(tiny_model):
    """The builder's own ArmoRM on a checkpoint in the published layout (architectures and auto_map naming the
    remote code, which is not even there), against the computation of ArmoRM's modeling_custom.py written out."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from builder.models import ModelSpec, load_reward_model
    from builder.stages import rewards

    folder = Path(tiny_model("reward-armo"))
    assert not list(folder.glob("*.py"))
    spec = ModelSpec("tiny:reward-armo", device="cpu")  # no trust_remote_code
    model, tokenizer = load_reward_model(spec)
    assert type(model).__name__ == "ArmoRMRewardModel"
    batch = {
        "prompt": [[{"role": "user", "content": "Write a poem."}]] * 2,
        "responses": [["Roses.", "A long one " * 5]] * 2,
    }
    scored = rewards.score_responses(
        batch, None, reward=spec, settings=rewards.RewardSettings(None, "2024-07-26", "local")
    )

    state = load_file(folder / "model.safetensors")
    pattern = list(model.config.gating_token_pattern)
    for response, score in zip(batch["responses"][0], scored["rewards"][0]):
        chat = [*batch["prompt"][0], {"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        gate_at = max(j for j in range(len(ids) - len(pattern) + 1) if ids[j : j + len(pattern)] == pattern)
        objectives = state["regression_layer.weight"] @ hidden[-1]
        x = hidden[gate_at]
        for i in range(4):
            x = state[f"gating.layers.{i}.weight"] @ x + state[f"gating.layers.{i}.bias"]
            x = torch.relu(x) if i < 3 else x
        gate = torch.softmax(x / 10, dim=0) * state["gating.logit_scale"][0]
        expected = (gate * (objectives @ state["reward_transform_matrix"])).sum().item()
        assert score == pytest.approx(expected, abs=1e-4)
    assert scored["rewards"][0] == pytest.approx(scored["rewards"][1], abs=1e-5)


def test_the_rank_barrier_is_files_in_the_parts_folder_and_names_a_rank_that_never_comes(tmp_path, monkeypatch):
    import threading

    from builder.pipeline import ranks

    monkeypatch.setattr(ranks, "POLL_SECONDS", 0.01)
    done = []
    late = threading.Timer(0.2, lambda: (tmp_path / "done-rank-00001").write_text(""))
    late.start()
    ranks.wait_for_parts(tmp_path, 0, 2)  # returns once rank 1, 0.2 s later, has marked its part
    done.append(True)
    assert done and (tmp_path / "done-rank-00000").exists()
    with pytest.raises(TimeoutError, match=r"Ranks \[2\] did not finish"):
        ranks.wait_for_parts(tmp_path, 0, 3, timeout=0.05)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"response_temperature": 0.0}, "Greedy decoding gives N copies of one answer"),
        ({"instruction_temperature": 2.5}, "Use at most 2"),
        ({"device": "sharded", "num_proc": 4}, "each worker would load a full copy"),
        ({"engine": "sglang"}, "Use auto, transformers or vllm"),
        ({"reward_num_proc": 0}, "reward_num_proc"),
    ],
)
def test_settings_vllm_or_the_gpus_cannot_run_are_refused_in_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_engine_auto_is_decided_without_cuda_and_says_why(caplog, monkeypatch):
    import logging

    from builder.build import resolve_engine

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with caplog.at_level(logging.INFO, logger="magpie_builder"):
        config = resolve_engine(small_config(engine="auto", shard_size=None))
    assert (config.engine, config.shard_size) == ("transformers", 256)
    assert "generation engine: transformers (no CUDA GPU is visible)" in caplog.text
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "vllm" else None)
    config = resolve_engine(small_config(engine="auto", shard_size=None))
    assert (config.engine, config.shard_size) == ("vllm", 4096)
    assert resolve_engine(small_config(engine="auto", shard_size=None, device="cpu")).engine == "transformers"


def test_the_reward_stage_runs_in_its_own_number_of_workers():
    from builder.build import BuildModels, model_specs
    from builder.stages import rewards

    config = small_config(num_proc=1, reward_num_proc=8)
    generator, reward = model_specs(config)
    stage = rewards.rewards(config, BuildModels(generator, reward, "local", "local", None))
    assert stage.num_proc == 8


def test_the_kv_cache_is_what_the_estimate_says_and_a_cache_that_cannot_fit_is_refused_with_what_fits(monkeypatch):
    import torch

    from builder.engines.transformers import generation
    from builder.models import ModelSpec, load_generator

    model, _ = load_generator(ModelSpec("tiny:chat-llama-3.1", device="cpu"))
    prompts = [[5, 6, 7, 8, 9, 10], [5, 6, 7]]
    batch = generation.ContinuousBatch(model, generation.SamplingParams(1.0, 1.0, 20, (1,)), prompts, 4, 0)
    batch.submit(prompts, [1, 2], 1)
    batch.run()
    blocks = {layer.key_buffer.untyped_storage().data_ptr(): layer for layer in batch.cache.layers}
    allocated = sum(layer.key_buffer.untyped_storage().nbytes() for layer in blocks.values())
    longest = batch.cache.longest_prompt
    assert allocated == generation.kv_cache_bytes(model.config, 4, longest, 20, 4)
    # On a GPU with too little free memory: the error names the settings and what fits.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**20, 80 * 2**30))
    cache = generation.SlotCache(model, 256, 1800, 2048)
    like = torch.empty(1, model.config.num_key_value_heads, 1, 16)
    groups = {(torch.device("cuda", 0), like.dtype, like.shape[1], like.shape[-1]): [0, 1]}
    with pytest.raises(MemoryError, match=r"generation_batch_size 256 .* Lower generation_batch_size to \d+"):
        cache._check_memory(groups)
