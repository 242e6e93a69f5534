"""How ecd_ray sets Ray up: worker set-up hooks and Parquet reads.

Ray runs a ``worker_process_setup_hook`` in every worker process it starts (Ray Data's read
tasks, the split coordinator, Ray Train's controller and workers...), so this module imports
nothing but the standard library at import time: a hook in ``ecd_ray.train.trainer`` imported
torch and transformers into each of them, about 7 s of CPU per process on a 2-core machine,
paid again whenever Ray started a fresh worker (every epoch's data read)."""

from __future__ import annotations

import logging
import os
from typing import Any

PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
DATASOURCE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"


def quiet_local_ray_logs() -> None:
    """Set-up hook of the local Ray that ``train`` starts. Ray Train's placement-group cleaner
    polls the State API, which a Ray started without its dashboard does not serve, and warns
    about it every second for the whole run (~90 lines in the demo); only its errors are kept.
    (It guards against a controller that dies ungracefully; a local run's ``ray.shutdown``
    removes the placement groups anyway.)"""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def read_parquet(path: str, **kwargs: Any) -> Any:
    """``ray.data.read_parquet`` through Ray Data's first Parquet datasource, unless
    ``RAY_DATA_USE_DATASOURCE_V2`` is set in the environment (then Ray's own choice holds).

    Ray 2.60 routes ``read_parquet`` through its new DataSourceV2 chain (``ListFiles ->
    ReadFilesParquetV2``) by default. Its ``ListFiles`` step took 8-15 s for one small file on
    every execution here (it provisions a pool of footer readers first), and every epoch of
    Ray Train re-executes the read: on a 2-core machine an epoch of 8 pairs on a tiny model
    took 12.5 s with it and 1.2 s without, a whole training command 97 s against 63 s. The
    pairs and shards ecd_ray reads are many small files, the case V2's listing is slowest at."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if DATASOURCE_V2_ENV not in os.environ and hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False
    return ray.data.read_parquet(path, **kwargs)
