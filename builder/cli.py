"""`magpie-build --config recipe.yaml [--field value ...]`: build, write, and optionally push a dataset."""

import logging
import sys


DEBUG_ENV = "MAGPIE_BUILDER_DEBUG"
# What a user fixes in the config, the command or the input (exit 2); anything else is a runtime failure (exit 1).
INPUT_ERRORS = (ValueError, FileNotFoundError, ImportError, KeyError)


def main(argv: list[str] | None = None) -> int:
    """Runs a build and returns the exit code: 0, 2 for a bad config or input, 1 for a runtime failure, 130 when
    interrupted. Errors are one line (`error: what, and the fix`); `--debug` (or MAGPIE_BUILDER_DEBUG=1) shows the
    traceback instead."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV) == "1"
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return run(argv)
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to resume; every finished batch of the model stages is kept.",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        if debug:
            raise
        code = 2 if isinstance(error, INPUT_ERRORS) else 1
        message = " ".join(str(error).split()) or type(error).__name__
        hint = "" if code == 2 else f" ({type(error).__name__}; --debug shows where)"
        print(f"error: {message}{hint}", file=sys.stderr)
        return code


def run(argv: list[str]) -> int:
    from .config import parse_config

    config = parse_config(argv)
    from .build import build
    from .publish.folder import write_folder
    from .publish.hub import push_to_hub

    # What can be checked before any model loads is, quietly: a failure is then one line.
    if config.output_dir:
        from .publish.folder import check_output_dir

        check_output_dir(config.output_dir, config.overwrite_output_dir)  # before any model loads
    if config.push_to_hub and not config.dry_run:
        from .build import check_models, resolve_engine, stages_for
        from .pipeline.runner import final_columns
        from .publish.hub import check_can_push

        resolved = resolve_engine(config)
        columns = final_columns(stages_for(resolved, check_models(resolved)))
        check_can_push(config.repo_id, columns, config.hub_revision, config.force_push)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.dry_run:
        from .dry_run import describe

        print(describe(config))
        return 0
    ranks = distributed_ranks(config)
    if config.num_proc > 1:
        # CUDA cannot be used in forked workers; the datasets multi-GPU recipe spawns them.
        import multiprocess

        multiprocess.set_start_method("spawn", force=True)
    result = build(config, ranks)
    if result is None:  # not rank 0: its part is written, rank 0 writes the dataset
        return 0
    if config.output_dir:
        folder = write_folder(result, config.output_dir)
        print(f"Dataset written to {folder}")
    if config.push_to_hub:
        url = push_to_hub(
            result,
            config.repo_id,
            private=config.private,
            revision=config.hub_revision,
            force=config.force_push,
            folder=config.output_dir,
        )
        print(f"Dataset pushed to {url}")
    return 0


def distributed_ranks(config):
    """Ranks of an `accelerate launch` / `torchrun` job, whose parts are kept under a folder named by the config."""
    from .pipeline.keys import digest
    from .pipeline.ranks import distributed_ranks as ranks_of

    return ranks_of("run-" + digest(config.to_dict() | {"output_dir": None, "push_to_hub": False}), config.cache_dir)


if __name__ == "__main__":
    sys.exit(main())
