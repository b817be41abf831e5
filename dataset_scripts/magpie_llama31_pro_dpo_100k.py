"""Magpie-Llama-3.1-Pro-DPO-100K: Llama-3.1-70B-Instruct writes 100K instructions and 5 responses each,
ArmoRM-Llama3-8B-v0.1 scores them, highest = chosen, lowest = rejected, 98/2 split.

    python dataset_scripts/magpie_llama31_pro_dpo_100k.py --output_dir out/pro-dpo-100k [--field value ...]

Every field of the recipe (the YAML beside this file) can be overridden on the command line.
"""

import sys
from pathlib import Path


RECIPE = Path(__file__).with_suffix(".yaml")


def main(argv: list[str] | None = None) -> int:
    from builder.cli import main as build_main

    return build_main(["--config", str(RECIPE), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
