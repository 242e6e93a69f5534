r"""ECD generation as a Ray job: `ecd-ray generate --config FILE [overrides]`.

Run it in-process (starts a local Ray unless RAY_ADDRESS is set):

    python -m jobs.generate --config jobs/configs/cpu_demo.yaml seeds.limit=20

Check first that a config fits its GPUs (weights, KV cache, sequences at once):

    ecd-ray plan --config jobs/configs/gen_70b_tp8.yaml --gpu h100-80gb

Submit it to a running cluster. The dashboard listens on 127.0.0.1 of the head node only: reach
it with `ray dashboard clusters/aws-gpu.yaml` (an SSH tunnel to localhost:8265) or
`kubectl port-forward` (clusters/README.md). `working_dir: "."` uploads this checkout (files
in .gitignore stay behind); the cluster image already has the package and its `gpu` extra, so
no `pip` entry is needed. `ray job submit` sets RAY_ADDRESS for the job, so the pipeline joins
the cluster:

    ray job submit --address http://127.0.0.1:8265 \
        --runtime-env-json '{"working_dir": ".",
            "env_vars": {"HF_HOME": "/mnt/shared/hf", "HF_HUB_OFFLINE": "1",
                         "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                         "TOKENIZERS_PARALLELISM": "false"}}' \
        -- python -m jobs.generate --config jobs/configs/gen_70b_tp8.yaml

One 8B replica on one GPU: the same command with `--config jobs/configs/gen_8b_1gpu.yaml`.
Dotted overrides follow the config, e.g. `rounds=4 teacher.replicas=4`.
"""

from __future__ import annotations

import sys

from ecd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
