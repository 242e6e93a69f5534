"""How ecd_ray sets Ray up: worker set-up hooks and Parquet reads.

Ray runs a ``worker_process_setup_hook`` in every worker process it starts (Ray Data's read
tasks, the split coordinator, Ray Train's controller and workers...), so this module imports
nothing but the standard library at import time: a hook in ``ecd_ray.train.trainer`` imported
torch and transformers into each of them, about 7 s of CPU per process on a 2-core machine,
paid again whenever Ray started a fresh worker (every epoch's data read)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
DATASOURCE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"
# Ray reads it once, at import, into ray._private.ray_constants.ENABLE_RAY_CLUSTER.
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def quiet_local_ray_logs() -> None:
    """Set-up hook of the local Ray that ``train`` starts. Ray Train's placement-group cleaner
    polls the State API, which a Ray started without its dashboard does not serve, and warns
    about it every second for the whole run (~90 lines in the demo); only its errors are kept.
    (It guards against a controller that dies ungracefully; a local run's ``ray.shutdown``
    removes the placement groups anyway.)"""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


@contextlib.contextmanager
def local_ray_on_loopback() -> Iterator[None]:
    """Around the ``ray.init(address="local")`` that starts a one-machine Ray: make Ray take
    127.0.0.1 as this node's address, so that its GCS, raylet, core workers, object manager and
    agents listen on loopback only (Ray 2.60 binds its servers to loopback when the node address
    is loopback; otherwise the node address is the machine's, and the GCS, raylet and workers
    listen on ``::``, the agents on ``0.0.0.0`` and that address).

    Ray has no ``ray.init`` option for it: ``_node_ip_address="127.0.0.1"`` is turned back into
    the machine's address. What decides it is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: when it
    is false, ``services.get_node_ip_address`` answers loopback (its purpose on macOS and
    Windows, where Ray is single-machine by default). So, while Ray starts, the variable is "0"
    in this process's environment (the GCS, raylet and agents it spawns inherit it) and the
    constant Ray read from it at import is False; both are put back afterwards, as the
    started node keeps its address. A value the user set is left alone: their choice holds.
    Only for a local Ray: a node of a real cluster must be reachable from the others."""
    if RAY_CLUSTER_ENV in os.environ:
        yield
        return
    constants = sys.modules.get("ray._private.ray_constants")  # imported with ray
    before = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[RAY_CLUSTER_ENV] = "0"
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        os.environ.pop(RAY_CLUSTER_ENV, None)
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = before


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
