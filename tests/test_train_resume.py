"""Safe resumes: a resume that would change a run's data order or step schedule is refused
before any work, naming each changed field; the precomputed reference log-probs are recomputed
when what they were computed from changes (checked against an independent computation), and
reused when nothing did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import _cfg, _metrics, separable_pairs

import ecd_ray.train.reference as reference
from ecd_ray.config import TrainConfig
from ecd_ray.train.collate import tokenize_table_rows
from ecd_ray.train.trainer import (
    FAIL_AT_STEP_ENV,
    RESUME_FREE_FIELDS,
    RESUME_KEY_FIELDS,
    RESUME_KEY_FILE,
    ResumeMismatch,
    _reference_stage,
    check_resume,
    collate_config,
    init_ray,
    latest_checkpoint,
    resume_key,
    train,
)


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for this module's runs (``train`` joins it instead of starting its own).
    The failure hook is set before Ray starts, so that its workers inherit it; it fires once
    per run folder (its ``.failed`` marker), so only the first attempt of a run crashes."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAIL_AT_STEP_ENV, "3")
        assert init_ray(TrainConfig(num_workers=1, ray={"num_cpus": 4}))
        try:
            yield
        finally:
            ray.shutdown()


def test_every_config_field_is_classified_for_resumes() -> None:
    """A new TrainConfig field must be put in the resume key or among the free fields."""
    key, free = set(RESUME_KEY_FIELDS), set(RESUME_FREE_FIELDS)
    assert not key & free
    assert key | free == set(TrainConfig.model_fields), \
        "classify in ecd_ray/train/trainer.py: " + ", ".join(
            sorted(set(TrainConfig.model_fields) ^ (key | free)))


def _fake_run(cfg: TrainConfig, model: Path) -> Path:
    """A run folder with a recorded resume key and an (empty) checkpoint folder."""
    ckpt = cfg.run_dir / "ray" / "attempt-0" / "step_000002"
    ckpt.mkdir(parents=True)
    (cfg.run_dir / RESUME_KEY_FILE).write_text(json.dumps({"fields": resume_key(cfg, model)}))
    return ckpt


def test_resume_key_compares_content_and_names_every_field(tmp_path: Path, tiny_model: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """No Ray: the driver-side check alone. Files compare by content (a moved copy is the
    same pairs/model), every changed field is named with both values, free fields pass."""
    pairs = separable_pairs(tmp_path / "pairs", 16)
    cfg = _cfg(tmp_path, tiny_model, pairs, "run_name=r")
    ckpt = _fake_run(cfg, tiny_model)
    copy, model_copy = tmp_path / "moved" / "pairs", tmp_path / "model-copy"
    shutil.copytree(pairs, copy)
    shutil.copytree(tiny_model, model_copy)
    free = _cfg(tmp_path, tiny_model, copy, "run_name=r", "checkpoint_every=1", "beta=0.3",
                "loss=ipo", "keep_checkpoints=5", "tensorboard=true", "cpus_per_worker=2")
    check_resume(ckpt, resume_key(free, model_copy), cfg.run_dir)  # accepted

    changed = _cfg(tmp_path, tiny_model, pairs, "run_name=r", "micro_batch_size=4",
                   "grad_accum=1", "max_pairs=12", "lr=0.001", "max_steps=3")
    with pytest.raises(ResumeMismatch) as info:
        check_resume(ckpt, resume_key(changed, tiny_model), cfg.run_dir)
    text = str(info.value)
    for line in ("micro_batch_size: 2 when the run started, 4 now",
                 "grad_accum: 2 when the run started, 1 now",
                 "max_pairs: null when the run started, 12 now",
                 "lr: 0.002 when the run started, 0.001 now",
                 "max_steps: null when the run started, 3 now"):
        assert f"  - {line}\n" in text
    assert "5 setting(s)" in text and str(tmp_path / "r" / RESUME_KEY_FILE) in text
    hint = text.split("use the recorded value(s): ")[1].split(". ")[0].split()
    assert sorted(hint) == ["grad_accum=2", "lr=0.002", "max_pairs=null", "max_steps=null",
                            "micro_batch_size=2"]
    assert "overwrite=true" in text and "run_name" in text

    # Other pairs (one row more) and other weights (same architecture) are other inputs.
    rows = pq.read_table(pairs / "pairs.parquet")
    grown = tmp_path / "grown"
    grown.mkdir()
    pq.write_table(pa.concat_tables([rows, rows.slice(0, 1)]), grown / "pairs.parquet")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(
        AutoModelForCausalLM.from_pretrained(tiny_model).config)
    other.save_pretrained(model_copy, safe_serialization=True)  # re-initialised weights
    with pytest.raises(ResumeMismatch) as info:
        check_resume(ckpt, resume_key(_cfg(tmp_path, tiny_model, grown, "run_name=r"),
                                      model_copy), cfg.run_dir)
    text = str(info.value)
    assert f"  - pairs: {pairs.resolve()} (content " in text and f"{grown.resolve()} (content" \
        in text
    assert f"  - model: {tiny_model.resolve()} (content " in text
    assert f"pairs={pairs.resolve()}" in text and f"model={tiny_model.resolve()}" in text

    # A checkpoint of a run recorded without a key (an older version) is resumed unchecked.
    (cfg.run_dir / RESUME_KEY_FILE).unlink()
    check_resume(ckpt, resume_key(changed, tiny_model), cfg.run_dir)
    assert "resuming without checking" in capsys.readouterr().out


def test_resume_with_changed_micro_batch_size_is_refused_before_any_work(
        tmp_path: Path, tiny_model: Path, shared_ray: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed at step 3 (checkpoint at step 2) is not resumed with another
    micro_batch_size: refused before Ray Train starts, leaving the run's records as they were.
    (A resume with unchanged fields: the resume tests of test_train.py, which pass this check.)
    reference=resident: the reference stage is the next test's subject, not this one's."""
    pairs = separable_pairs(tmp_path / "pairs", 16)  # 16 / 1 worker / (2 x 2) = 4 steps
    run_args = ("run_name=r", "strategy=ddp", "num_workers=1", "checkpoint_every=2",
                "reference=resident")
    with pytest.raises(Exception, match="injected failure"):
        train(_cfg(tmp_path, tiny_model, pairs, *run_args, "max_failures=0"))
    run = tmp_path / "r"
    assert latest_checkpoint(run).name == "step_000002"
    records = {name: (run / name).read_text() for name in ("train_config.json", RESUME_KEY_FILE)}

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused resume started work")

    monkeypatch.setattr("ray.train.torch.TorchTrainer", must_not_run)
    with pytest.raises(ResumeMismatch) as info:
        train(_cfg(tmp_path, tiny_model, pairs, *run_args, "micro_batch_size=4"))
    text = str(info.value)
    assert "  - micro_batch_size: 2 when the run started, 4 now\n" in text
    assert "1 setting(s)" in text and "micro_batch_size=2" in text and "overwrite=true" in text
    assert {name: (run / name).read_text() for name in records} == records
    assert len(list(run.glob("ray/attempt-*"))) == 1
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]


def _independent_logps(model: torch.nn.Module, tok: object, row: dict, cfg: TrainConfig
                       ) -> list[float]:
    """Summed response log-probs of one pair's chosen and rejected answers: one plain forward
    per sequence, log-softmax in float64 (not the trainer's batched, chunked path)."""
    pair = tokenize_table_rows(tok, [row], collate_config(cfg))[0]
    out = []
    for ids, mask in ((pair.chosen_ids, pair.chosen_mask), (pair.rejected_ids, pair.rejected_mask)):
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
        picked = logp.gather(1, x[0, 1:, None])[:, 0]
        out.append(float((picked * torch.tensor(mask[1:], dtype=torch.float64)).sum()))
    return out


def _stored(out: Path) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet"))).to_pylist()


def test_reference_recomputed_when_max_length_changes_reused_otherwise(
        tmp_path: Path, tiny_model: Path, shared_ray: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = separable_pairs(tmp_path / "pairs", 8)
    computed = []
    original = reference.add_reference_logprobs

    def counting(*args: object, **kwargs: object) -> int:
        computed.append(args[3].max_length)  # the CollateConfig
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "add_reference_logprobs", counting)
    long = _cfg(tmp_path, tiny_model, pairs, "run_name=ref", "max_prompt_tokens=16")
    short = _cfg(tmp_path, tiny_model, pairs, "run_name=ref", "max_prompt_tokens=16",
                 "max_length=20")  # 4 response tokens: the answers are cut
    out = _reference_stage(long, tiny_model)
    marker = out / "_SUCCESS"
    first, mtime = _stored(out), marker.stat().st_mtime_ns
    # Nothing it depends on changed (fields that only matter to training may): reused.
    same = _cfg(tmp_path, tiny_model, pairs, "run_name=ref", "max_prompt_tokens=16",
                "micro_batch_size=4", "lr=0.01", "seed=3")
    assert _reference_stage(same, tiny_model) == out
    assert computed == [64] and marker.stat().st_mtime_ns == mtime
    assert "recomputing" not in capsys.readouterr().out

    _reference_stage(short, tiny_model)
    assert computed == [64, 20]
    said = [line for line in capsys.readouterr().out.splitlines() if "recomputing" in line]
    assert said == [f"[ecd-ray] recomputing the reference log-probs in {out}: max_length 64 -> 20"]
    second = _stored(out)
    assert json.loads(marker.read_text())["key"]["max_length"] == 20

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for rows, cfg in ((first, long), (second, short)):
        for row in rows[:2]:
            chosen, rejected = _independent_logps(model, tok, row, cfg)
            assert row["ref_chosen_logp"] == pytest.approx(chosen, abs=1e-4)
            assert row["ref_rejected_logp"] == pytest.approx(rejected, abs=1e-4)
    for a, b in zip(first, second, strict=True):
        assert a["pair_id"] == b["pair_id"]
        assert abs(a["ref_chosen_logp"] - b["ref_chosen_logp"]) > 1e-3  # not stale
