"""princeton-nlp/llama3-ultrafeedback-armorm: the prompts of HuggingFaceH4/ultrafeedback_binarized answered 5 times
by the policy (on-policy data), ArmoRM-Llama3-8B-v0.1 scores, highest = chosen, lowest = rejected, the dataset's own
test split as test.

    python dataset_scripts/llama3_ultrafeedback_armorm.py --output_dir out/llama3-ultrafeedback-armorm [--field value ...]

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
