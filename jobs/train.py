r"""Preference training (DPO and friends) as a Ray job: `ecd-ray train --config FILE [overrides]`.

Run it in-process (starts a local Ray unless RAY_ADDRESS is set):

    python -m jobs.train --config ecd_ray/configs/demo_train.yaml pairs=out/demo/pairs

Check first that a config fits its GPUs (ZeRO shards, activations, logits):

    ecd-ray plan --config jobs/configs/train_8b_zero3_2nodes.yaml --gpu h100-80gb

Submit it to a running cluster (two 8-GPU nodes for train_8b_zero3_2nodes.yaml). The dashboard
listens on 127.0.0.1 of the head node only: reach it with `ray dashboard clusters/aws-gpu.yaml`
or `kubectl port-forward` (clusters/README.md). The cluster image already has the package, so
no `pip` entry is needed; pairs, model and output_dir must be on storage every node mounts at
the same path (/mnt/shared, /mnt/models):

    ray job submit --address http://127.0.0.1:8265 \
        --runtime-env-json '{"working_dir": ".",
            "env_vars": {"HF_HOME": "/mnt/shared/hf", "HF_HUB_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false", "NCCL_DEBUG": "WARN"}}' \
        -- python -m jobs.train --config jobs/configs/train_8b_zero3_2nodes.yaml

Dotted overrides follow the config, e.g. `max_steps=20 num_workers=8`.
"""

from __future__ import annotations

import sys

from ecd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
