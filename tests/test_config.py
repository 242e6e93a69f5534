"""Config errors: one clear message, a non-zero exit, and Ray never started."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ecd_ray.config import ConfigError, load_config, parse_overrides


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    # Runs the real CLI in a fresh interpreter and reports whether Ray was ever imported.
    code = textwrap.dedent(f"""
        import sys
        from ecd_ray.cli import main
        rc = main({args!r})
        print("RAY_IMPORTED" if "ray" in sys.modules else "RAY_NOT_IMPORTED")
        sys.exit(rc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_misspelled_key_names_the_closest_valid_one(tmp_path: Path) -> None:
    cfg = _write(tmp_path, """
        teacher:
          engin: vllm
    """)
    proc = _cli(["generate", "--config", str(cfg)])
    assert proc.returncode == 2
    assert "unknown key 'teacher.engin'" in proc.stderr
    assert "did you mean 'teacher.engine'" in proc.stderr
    assert proc.stderr.count("unknown key") == 1
    assert "RAY_NOT_IMPORTED" in proc.stdout


def test_wrong_type_is_one_clear_message(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "rounds: three\n")
    proc = _cli(["generate", "--config", str(cfg)])
    assert proc.returncode == 2
    assert "'rounds'" in proc.stderr and "integer" in proc.stderr
    assert "1 problem(s)" in proc.stderr
    assert "RAY_NOT_IMPORTED" in proc.stdout


def test_missing_seeds_file(tmp_path: Path) -> None:
    proc = _cli(["generate", f"seeds.path={tmp_path / 'nope.jsonl'}"])
    assert proc.returncode == 2
    assert "seeds file not found" in proc.stderr and "nope.jsonl" in proc.stderr
    assert "RAY_NOT_IMPORTED" in proc.stdout


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["rounds=-1", "teacher.temprature=1", f"seeds.path={tmp_path}/x.jsonl"])
    problems = info.value.problems
    assert len(problems) == 2  # path checks run only once the types are valid
    assert any("rounds" in p for p in problems)
    assert any("did you mean 'teacher.temperature'" in p for p in problems)


def test_overrides_are_typed_and_nested() -> None:
    tree, problems = parse_overrides(["rounds=4", "teacher.engine=vllm", "teacher.top_p=0.5"])
    assert problems == []
    assert tree == {"rounds": 4, "teacher": {"engine": "vllm", "top_p": 0.5}}
    cfg = load_config(None, ["rounds=4", "teacher.engine=transformers"])
    assert cfg.rounds == 4 and cfg.teacher.engine == "transformers"


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["rounds"])


def test_unknown_operation_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'deepen'"):
        load_config(None, ["evolution.operations=[deepn]"])


def test_relative_seed_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text('{"instruction": "hi there"}\n')
    cfg = load_config(_write(tmp_path, "seeds:\n  path: s.jsonl\n"))
    assert Path(cfg.seeds.path) == (tmp_path / "s.jsonl").resolve()


def test_teacher_mode_refuses_the_135m_model() -> None:
    with pytest.raises(ConfigError, match="cannot rewrite instructions"):
        load_config(None, ["evolution.mode=teacher"])


def test_a_pasted_api_key_is_refused_and_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher.engine=openai", "teacher.openai.api_key_env=sk-live-0123"])
    assert "NAME of an environment variable" in str(info.value)
    assert "sk-live-0123" not in str(info.value)


def test_length_limits_are_cross_checked_against_the_context() -> None:
    from ecd_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["teacher.vllm.max_model_len=1024", "teacher.max_new_tokens=256"])
    text = str(err.value)
    # (1024 - 256 - 64) tokens x 3 characters - 3 rounds x 400 directive characters = 912
    assert "lower seeds.max_instruction_chars to 912" in text
    assert "raise teacher.vllm.max_model_len" in text
    with pytest.raises(ConfigError, match="leaves no room for a prompt"):
        load_config(None, ["teacher.vllm.max_model_len=512", "teacher.max_new_tokens=512"])
    ok = load_config(None, ["teacher.vllm.max_model_len=1024", "teacher.max_new_tokens=256",
                            "seeds.max_instruction_chars=912",
                            "evolution.max_instruction_chars=2000"])
    assert ok.teacher.vllm.max_model_len == 1024
    # the transformers engine is counted per request only (its limit is the model's)
    load_config(None, ["teacher.engine=transformers", "teacher.vllm.max_model_len=1024"])


def test_progress_line_shows_done_in_flight_rate_rejects_and_eta() -> None:
    import io

    from ecd_ray.pipeline.progress import Progress

    out = io.StringIO()
    p = Progress(total=100, done=10, seed_rejects=3, stream=out, plain_interval_s=0.0)
    p.engines_ready()
    p.ready_at -= 10.0  # ten seconds of chains
    p.update(in_flight=64, tokens=2000)
    p.add_done(20, stopped_early=2)
    line = out.getvalue().strip().splitlines()[-1]
    assert "seeds 30/100 (30%)" in line and "in flight 64" in line
    assert "200 tok/s" in line and "rejects 3 seeds + 2 chains" in line
    assert "ETA 0m35s" in line  # 20 seeds in 10 s, 70 left
