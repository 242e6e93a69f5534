"""The pairs of one uninterrupted run of the small configuration (``reliability_runs``),
which every faulted-then-resumed run must reproduce exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from reliability_runs import N_SEEDS, check_complete, pairs, run_args

from ecd_ray.config import load_config


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory,
              tiny_model: Path) -> tuple[Path, list[dict[str, Any]]]:
    """One uninterrupted run (in-process): its folder and its pairs."""
    from ecd_ray.pipeline.generate import generate

    out = tmp_path_factory.mktemp("reference")
    cfg = load_config(None, run_args(out, tiny_model, "ref"))
    generate(cfg)
    check_complete(cfg.run_dir)  # and the lock is released after a normal run
    got = pairs(cfg.run_dir)
    assert len(got) > N_SEEDS  # rounds=2, policy=all: up to two pairs a seed
    return cfg.run_dir, got
