"""Paths outside the output folder are refused: a ``run_name`` that is not one plain folder
name (``../../etc``, an absolute path, ``..``, empty, NUL, either path separator) is a config
error of both generation and training, at load and through the CLI, and nothing is created.
No Ray, no model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecd_ray.config import SAMPLE_SEEDS, ConfigError, load_config, load_train_config

BAD_NAMES = ["../../etc", "..", ".", "", "   ", "/etc", "/tmp/elsewhere", "a/b", "a\\b",
             "..\\..\\etc", "a\0b", " demo"]


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "ecd-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ecd_ray.cli"]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model"
    model.mkdir()
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    pq.write_table(pa.table({"x": [1]}), pairs / "p.parquet")
    return {"model": model, "pairs": pairs, "out": tmp_path / "sub" / "out"}


def _yaml(tmp_path: Path, name: str) -> Path:
    """A config file naming ``name`` (a YAML double-quoted string can hold NUL and '\\')."""
    escaped = name.replace("\\", "\\\\").replace("\0", "\\0")
    path = tmp_path / "cfg.yaml"
    path.write_text(f'run_name: "{escaped}"\n')
    return path


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_refuses_a_run_name_that_is_not_a_plain_folder(
        tmp_path: Path, inputs: dict[str, Path], name: str) -> None:
    path = _yaml(tmp_path, name)
    run = [f"output_dir={inputs['out']}", f"seeds.path={SAMPLE_SEEDS}",
           f"teacher.model={inputs['model']}"]
    tr = [f"output_dir={inputs['out']}", f"pairs={inputs['pairs']}", f"model={inputs['model']}"]
    for load, overrides in ((load_config, run), (load_train_config, tr)):
        with pytest.raises(ConfigError) as err:
            load(path, overrides)
        assert len(err.value.problems) == 1
        assert err.value.problems[0].startswith("'run_name': ")
        assert "plain folder name inside output_dir" in err.value.problems[0]


def test_plain_names_still_load(inputs: dict[str, Path]) -> None:
    for name in ("demo", "run-2", "a.b", "..x", "x..", "ünïcode"):
        cfg = load_config(None, [f"run_name={name}", f"output_dir={inputs['out']}",
                                 f"teacher.model={inputs['model']}"])
        assert cfg.run_dir.parent == inputs["out"]
        tcfg = load_train_config(None, [f"run_name={name}", f"pairs={inputs['pairs']}",
                                        f"model={inputs['model']}"])
        assert tcfg.run_dir.name == name


@pytest.mark.parametrize("command", ["generate", "train"])
@pytest.mark.parametrize("name", ["../../etc", "/tmp/ecd-ray-escape-test", "..", "a\\b"])
def test_cli_refuses_and_creates_nothing(tmp_path: Path, inputs: dict[str, Path],
                                         command: str, name: str) -> None:
    out_dir = tmp_path / "sub" / "out"
    args = ([f"seeds.path={SAMPLE_SEEDS}", f"teacher.model={inputs['model']}"]
            if command == "generate" else [f"pairs={inputs['pairs']}", f"model={inputs['model']}"])
    before = _files(tmp_path)
    proc = subprocess.run([*_cli(), command, f"run_name={name}", f"output_dir={out_dir}", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and "'run_name'" in problems[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(tmp_path) == before  # not even output_dir
    assert not Path("/tmp/ecd-ray-escape-test").exists()
