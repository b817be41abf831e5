"""`magpie-build --config recipe.yaml [--field value ...]`: build, write, and optionally push a dataset."""

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from .config import parse_config

    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .build import build
    from .publish.folder import write_folder
    from .publish.hub import push_to_hub

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
