"""DPO on a preference dataset built by magpie-builder, in the alignment-handbook / TRL script shape.

    ACCELERATE_LOG_LEVEL=info accelerate launch --config_file training/accelerate_configs/zero3.yaml \
        training/dpo.py --config training/recipes/llama-3.1-8b-magpie-dpo/config_full.yaml [--field value ...]

The dataset is a Hub id or a local folder the builder wrote (`data/{split}-*.parquet`); `tiny:<name>` models are
the builder's tiny local models, built on first use. A run resumes from the last checkpoint in `output_dir`.
"""

import logging
import sys


def make_parser():
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, DPOConfig, ModelConfig))


def resolve(name_or_path: str) -> str:
    from builder.testing.tiny import resolve_model_path

    return resolve_model_path(name_or_path)


def load_models(model_args, training_args):
    """(policy, reference, tokenizer). The reference is a second copy, frozen; with PEFT there is none (the
    adapter-free policy is the reference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    kwargs = dict(
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
    )
    quantization = quantization_of(model_args)
    if quantization is not None:
        from accelerate import PartialState

        # Each process puts its quantized copy on its own GPU (what TRL's removed get_kbit_device_map did).
        kwargs |= {"quantization_config": quantization, "device_map": {"": PartialState().local_process_index}}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    ref_model = None if model_args.use_peft else AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, ref_model, tokenizer


def quantization_of(model_args):
    """TRL's bitsandbytes config for `load_in_4bit` / `load_in_8bit`, or None. A quantized model trains only as the
    base of a LoRA adapter (QLoRA), so without `use_peft` it is refused rather than ignored."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    if not model_args.use_peft:
        raise ValueError(
            "load_in_4bit / load_in_8bit quantize the policy, which then cannot be fully trained: set use_peft: true "
            "(QLoRA: a LoRA adapter on the quantized model), or drop the quantization."
        )
    from trl import get_quantization_config

    return get_quantization_config(model_args)


def last_checkpoint(training_args) -> str | None:
    import os

    from transformers.trainer_utils import get_last_checkpoint

    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    if os.path.isdir(training_args.output_dir):
        return get_last_checkpoint(training_args.output_dir)
    return None


def main(argv: list[str] | None = None):
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)

    from datasets import load_dataset
    from transformers import set_seed
    from trl import DPOTrainer, get_peft_config

    logging.basicConfig(level=training_args.get_process_log_level(), format="%(asctime)s %(levelname)s %(message)s")
    logger = logging.getLogger("training.dpo")
    set_seed(training_args.seed)

    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if split not in dataset:
            raise ValueError(
                f"{script_args.dataset_name} has no split {split!r} (it has {sorted(dataset)}); set "
                "dataset_train_split / dataset_test_split."
            )
    model, ref_model, tokenizer = load_models(model_args, training_args)
    evaluate = training_args.eval_strategy != "no" or training_args.do_eval

    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if evaluate else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )

    checkpoint = last_checkpoint(training_args)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {**result.metrics, "train_samples": len(dataset[script_args.dataset_train_split])}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)

    if evaluate:
        metrics = {**trainer.evaluate(), "eval_samples": len(dataset[script_args.dataset_test_split])}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name, tags=["dpo", "magpie", "trl"])
    trainer.accelerator.wait_for_everyone()
    return trainer


def close_process_group() -> None:
    # A process group left open at exit can abort a rank in its C++ teardown ("terminate called without an active
    # exception"), which fails a finished run.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    close_process_group()
