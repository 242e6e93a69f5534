"""ruff over the whole repository: style problems fail the test suite, and so CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install '.[dev]')")
    proc = subprocess.run([ruff, "check", str(ROOT), "--output-format", "concise"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
