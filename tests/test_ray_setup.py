"""``ecd_ray.ray_setup``: the worker set-up hook stays free of torch, and Parquet reads go
through Ray Data's first datasource unless the user asks for DataSourceV2.

Both run in a fresh interpreter: this test session has long imported torch, and Ray's
``DataContext`` is per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_USE_DATASOURCE_V2"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_worker_set_up_hook_imports_no_torch() -> None:
    # Ray runs the hook in every worker it starts; importing torch there cost ~7 s of CPU each.
    out = _python("""
        import sys
        import ecd_ray.ray_setup as rs
        rs.quiet_local_ray_logs()
        heavy = sorted(m for m in ("torch", "transformers", "deepspeed", "vllm", "ray")
                       if m in sys.modules)
        print("HEAVY", heavy)
    """)
    assert "HEAVY []" in out, out


def test_read_parquet_avoids_datasource_v2_unless_the_env_var_is_set(tmp_path: Path) -> None:
    code = f"""
        import os
        import pyarrow as pa, pyarrow.parquet as pq
        import ray, ray.data
        from ecd_ray.ray_setup import DATASOURCE_V2_ENV, read_parquet
        pq.write_table(pa.table({{"x": [1, 2, 3]}}), {str(tmp_path / "a.parquet")!r})
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            ctx = ray.data.DataContext.get_current()
            ds = read_parquet({str(tmp_path)!r})
            print("V1", ctx.use_datasource_v2, ds._logical_plan.dag.dag_str)
            print("ROWS", sorted(r["x"] for r in ds.take_all()))
            os.environ[DATASOURCE_V2_ENV] = "1"
            ctx.use_datasource_v2 = True  # what the user asked for through the env var
            ds = read_parquet({str(tmp_path)!r})
            print("V2", ctx.use_datasource_v2, ds._logical_plan.dag.dag_str)
        finally:
            ray.shutdown()
    """
    out = _python(code)
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines()}
    assert lines["V1"].startswith("V1 False") and "ListFiles" not in lines["V1"], out
    assert lines["ROWS"] == "ROWS [1, 2, 3]", out
    # with the env var set, Ray's own choice (here DataSourceV2) is left alone
    assert lines["V2"].startswith("V2 True") and "ListFiles" in lines["V2"], out
