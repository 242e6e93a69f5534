"""The instruction-following evaluator: IFEval-format input, scoring, reports, generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecd_ray.cli import main
from ecd_ray.evaluate.ifeval import read_prompts, score

PROMPTS = [
    {"key": 1, "prompt": "Describe rain without commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Describe snow in lowercase, in fewer than 6 words.",
     "instruction_id_list": ["change_case:english_lowercase", "length_constraints:number_words"],
     # HF's copy of IFEval carries every kwarg key, null where unused: nulls are ignored.
     "kwargs": [{"num_words": None}, {"relation": "less than", "num_words": 6, "letter": None}]},
    {"key": 3, "prompt": "End with the phrase 'Any other questions?'",
     "instruction_id_list": ["startend:end_checker"],
     "kwargs": [{"end_phrase": "Any other questions?"}]},
]
RESPONSES = {
    1: "Rain falls softly on the roof.",                     # passes
    2: "white cold flakes falling slowly everywhere today",  # lowercase ok, 7 words: fails
    3: "Snow is frozen water.\n**Any other questions?**",     # strict fails, loose passes
}


def _write(tmp_path: Path) -> tuple[Path, Path]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    responses = tmp_path / "responses.jsonl"
    responses.write_text("\n".join(json.dumps({"key": k, "response": r})
                                   for k, r in RESPONSES.items()) + "\n")
    return prompts, responses


def test_scores_worked_by_hand(tmp_path: Path) -> None:
    prompts, _ = _write(tmp_path)
    result = score(read_prompts(prompts), [RESPONSES[k] for k in (1, 2, 3)])
    assert result["prompt_level_strict"] == pytest.approx(1 / 3)
    assert result["prompt_level_loose"] == pytest.approx(2 / 3)
    assert result["instruction_level_strict"] == pytest.approx(2 / 4)
    assert result["instruction_level_loose"] == pytest.approx(3 / 4)
    assert result["per_type"]["length_constraints:number_words"] == {
        "n": 1, "strict": 0.0, "loose": 0.0}
    assert result["per_type"]["startend:end_checker"]["loose"] == 1.0


def test_cli_scores_a_responses_file_and_writes_the_report(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    prompts, responses = _write(tmp_path)
    out = tmp_path / "report"
    assert main(["evaluate", "--prompts", str(prompts), "--responses", str(responses),
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == 3 and report["instructions"] == 4
    assert "| `punctuation:no_comma` | 1 | 100.0% | 100.0% |" in (out / "report.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prompt level strict" in capsys.readouterr().out


def test_bad_prompt_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": 1, "prompt": "x", "instruction_id_list": ["nope:nope"],
                               "kwargs": [{}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: unknown instruction ids"):
        read_prompts(bad)
    bad.write_text('{"key": 1}\n')
    with pytest.raises(ValueError, match="not an IFEval prompt row"):
        read_prompts(bad)


def test_missing_responses_are_an_error(tmp_path: Path) -> None:
    prompts, responses = _write(tmp_path)
    responses.write_text(json.dumps({"key": 1, "response": "x"}) + "\n")
    assert main(["evaluate", "--prompts", str(prompts), "--responses", str(responses),
                 "--out", str(tmp_path / "r")]) == 2


def test_evaluate_generates_with_a_real_engine(tmp_path: Path, tiny_model: Path) -> None:
    prompts, _ = _write(tmp_path)
    out = tmp_path / "gen"
    assert main(["evaluate", "--prompts", str(prompts), "--model", str(tiny_model),
                 "--engine", "transformers", "--max-new-tokens", "8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["1", "2", "3"]  # a random model may answer empty
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == str(tiny_model) and report["prompts"] == 3
