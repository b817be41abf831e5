"""`magpie-build --config recipe.yaml [--field value ...]`: build, write, and optionally push a dataset."""

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from .config import parse_config

    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .build import build
    from .publish import write_folder

    result = build(config)
    print(result.ledger.summary())
    if config.output_dir:
        folder = write_folder(result, config.output_dir)
        print(f"Dataset written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
