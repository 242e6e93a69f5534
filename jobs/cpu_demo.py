"""The CPU demo as a Ray job: ECD pairs from the bundled seeds with SmolLM2, training, evaluation.

Run it in-process (starts a local Ray):

    python -m jobs.cpu_demo seeds.limit=20 rounds=2

Or submit it to a running Ray cluster (the job connects through RAY_ADDRESS, which
`ray job submit` sets); the working directory travels with the job:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}' \
        -- python -m jobs.cpu_demo seeds.limit=20 rounds=2 --no-train

Arguments are those of `ecd-ray run`: dotted overrides (`train.*` for training) and --no-train.
"""

from __future__ import annotations

import sys

from ecd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
