"""`magpie-build --config recipe.yaml [--field value ...]`: build, write, and optionally push a dataset."""

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from .config import parse_config

    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .build import build
    from .publish import push_to_hub, write_folder

    result = build(config)
    print(result.ledger.summary())
    if config.output_dir:
        folder = write_folder(result, config.output_dir)
        print(f"Dataset written to {folder}")
    if config.push_to_hub:
        url = push_to_hub(result, config.repo_id, private=config.private, revision=config.hub_revision,
                          force=config.force_push, folder=config.output_dir)
        print(f"Dataset pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
