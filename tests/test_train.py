"""Training: DeepSpeed config, accumulation invariance, reference log-probs, and ZeRO-3 on 2 CPU
workers in Ray Train (learning, checkpoints, restart and resume at the right step)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ecd_ray.config import ConfigError, TrainConfig, load_train_config
from ecd_ray.schema import PAIRS
from ecd_ray.train.collate import collate_pairs, concatenated_logprobs, tokenize_table_rows
from ecd_ray.train.policy import deepspeed_config
from ecd_ray.train.trainer import (
    FAIL_AT_STEP_ENV,
    SEAL,
    _seal,
    checkpoint_problem,
    collate_config,
    plan_steps,
    train,
)

WORDS = ["river", "castle", "apple", "window", "forest", "music", "garden", "winter"]


def separable_pairs(path: Path, n: int = 64) -> Path:
    """Preference pairs a tiny model can learn: chosen always 'yes ...', rejected 'no ...'."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        rows.append({
            "pair_id": f"p{i}", "seed_id": f"s{i}", "strategy": "test",
            "prompt": [{"role": "user", "content": f"Tell me about the {w} number {i}."}],
            "chosen": [{"role": "assistant", "content": "yes yes yes yes"}],
            "rejected": [{"role": "assistant", "content": f"no {w} no {w}"}],
        })
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS), path / "pairs.parquet")
    return path


def _cfg(tmp_path: Path, model: Path, pairs: Path, *extra: str) -> TrainConfig:
    return load_train_config(None, [
        f"output_dir={tmp_path}", f"pairs={pairs}", f"model={model}", "num_workers=2",
        "micro_batch_size=2", "grad_accum=2", "lr=0.002", "beta=0.5", "max_length=64",
        "max_prompt_tokens=48", "param_persistence_threshold=0", "schedule=constant",
        "ray.num_cpus=4", *extra])


def test_deepspeed_config_is_generated_from_the_project_config(tmp_path: Path) -> None:
    cfg = TrainConfig(zero_stage=3, offload_optimizer=True, grad_accum=8, micro_batch_size=1,
                      clip_grad=0.5, warmup_steps=3, schedule="cosine", lr=1e-5)
    ds = deepspeed_config(cfg, total_steps=100, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["gradient_accumulation_steps"] == 8 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"lr": 1e-5, "weight_decay": 0.0, "torch_adam": True}
    assert "scheduler" not in ds  # Policy passes lr_lambda's LambdaLR (both strategies)
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    ds = deepspeed_config(cfg.model_copy(update={"deepspeed_config": str(override)}), 100, False)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # merged, not replaced
    # ZeRO-3 buckets sized from the model's hidden size (HF's "auto" rule), unless overridden
    assert "reduce_bucket_size" not in deepspeed_config(cfg, 100, False)["zero_optimization"]
    sized = deepspeed_config(cfg, 100, False, hidden_size=576)["zero_optimization"]
    assert sized["reduce_bucket_size"] == 576 * 576
    assert sized["stage3_prefetch_bucket_size"] == int(0.9 * 576 * 576)
    override.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}}))
    ds = deepspeed_config(cfg.model_copy(update={"deepspeed_config": str(override)}), 100, False,
                          hidden_size=576)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123


def test_deepspeed_and_ddp_follow_the_same_lr_schedule(tmp_path: Path, tiny_model: Path) -> None:
    """The lr of every optimizer step, ZeRO-3 and DDP, against cosine computed by hand: no
    hidden warm-up (DeepSpeed's WarmupCosineLR forces 2 steps of it)."""
    import math

    from ecd_ray.train.policy import Policy

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "DS_ACCELERATOR": "cpu"})
    rows = pq.read_table(separable_pairs(tmp_path / "pairs", 6) / "pairs.parquet").to_pylist()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    want = [0.5 * (1 + math.cos(math.pi * k / 6)) * 1e-3 for k in range(6)]
    warm = [1e-3 * 1 / 3, 1e-3 * 2 / 3] + [  # 2 linear warm-up steps, then cosine over 4
        0.5 * (1 + math.cos(math.pi * k / 4)) * 1e-3 for k in range(4)]
    for strategy in ("deepspeed", "ddp"):
        for warmup, expected in ((0, want), (2, warm)):
            cfg = TrainConfig(model=str(tiny_model), strategy=strategy, lr=1e-3,
                              schedule="cosine", warmup_steps=warmup, micro_batch_size=1,
                              grad_accum=1, max_length=64, max_prompt_tokens=48, loss="sft",
                              param_persistence_threshold=0)
            policy = Policy(cfg, tiny_model, total_steps=6, distributed=False)
            pairs = tokenize_table_rows(tok, rows, collate_config(cfg))
            seen = []
            for p in pairs:
                seen.append(policy.lr())  # the rate the next optimizer step uses
                policy.forward_backward(collate_pairs([p], 2), None)
            assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12), (strategy, warmup)


def test_train_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_train_config(None, [f"pairs={tmp_path}", "los=dpo", "max_length=10",
                                 "max_prompt_tokens=20"])
    text = str(info.value)
    assert "did you mean 'loss'" in text and "max_length" in text


def test_gradient_checkpointing_on_and_off_as_typed_on_the_command_line(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare on/off as a boolean: ``gradient_checkpointing=on`` was refused as
    "got True"; it means "on"."""
    pairs = separable_pairs(tmp_path / "pairs", 2)
    for typed, meant in (("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto")):
        cfg = load_train_config(None, [f"pairs={pairs}", f"gradient_checkpointing={typed}"])
        assert cfg.gradient_checkpointing == meant, typed
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_train_config(None, [f"pairs={pairs}", "gradient_checkpointing=1"])


def test_plan_steps_refuses_too_few_pairs() -> None:
    cfg = TrainConfig(num_workers=2, micro_batch_size=4, grad_accum=4)
    assert plan_steps(cfg, 100) == (3, 3)
    with pytest.raises(ValueError, match="too few"):
        plan_steps(cfg, 20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accumulation_invariance_1x8_vs_8x1(tmp_path: Path, tiny_model: Path) -> None:
    """One global batch of 8 pairs as 1 micro-batch x 8 accumulation steps and as 8 x 1 gives
    the same updated weights (fp32, SGD, DeepSpeed ZeRO-3 on one CPU rank: the real path)."""
    from transformers import AutoTokenizer

    from ecd_ray.train.policy import Policy

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "DS_ACCELERATOR": "cpu"})
    rows = pq.read_table(separable_pairs(tmp_path / "pairs", 8) / "pairs.parquet").to_pylist()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = TrainConfig(model=str(tiny_model), optimizer="sgd", lr=0.5, schedule="constant",
                       clip_grad=None, loss="sft", max_length=64, max_prompt_tokens=48,
                       param_persistence_threshold=0)
    weights = []
    for micro, accum in ((8, 1), (1, 8)):
        cfg = base.model_copy(update={"micro_batch_size": micro, "grad_accum": accum})
        policy = Policy(cfg, tiny_model, total_steps=1)
        pairs = tokenize_table_rows(tok, rows, collate_config(cfg))
        for start in range(0, 8, micro):
            policy.forward_backward(collate_pairs(pairs[start : start + micro], 2), None)
        out = tmp_path / f"w{micro}x{accum}"
        policy.export(out, rank=0)
        weights.append(_load(out))
    assert weights[0].keys() == weights[1].keys()
    init = _load(tiny_model)
    moved = max((weights[0][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-4  # the step did change the weights
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=2e-6)


def _ddp_rank(rank: int, port: int, model: str, rows: list, out: str) -> None:
    """One of two gloo ranks: the policy's DDP path, 2 micro-batches of 2 pairs per step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoTokenizer

    from ecd_ray.train.policy import Policy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(model=model, strategy="ddp", optimizer="sgd", lr=0.5,
                          schedule="constant", clip_grad=None, loss="sft", max_length=64,
                          max_prompt_tokens=48, micro_batch_size=2, grad_accum=2)
        policy = Policy(cfg, Path(model), total_steps=1, distributed=False)
        policy.model = DistributedDataParallel(policy.module)
        calls: list[int] = []

        def counting_allreduce(state, bucket):  # noqa: ANN001, ANN202
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            calls.append(policy.micro_steps)
            return allreduce_hook(state, bucket)

        policy.model.register_comm_hook(None, counting_allreduce)
        tok = AutoTokenizer.from_pretrained(model)
        pairs = tokenize_table_rows(tok, rows[rank * 4:(rank + 1) * 4], collate_config(cfg))
        for start in (0, 2):
            policy.forward_backward(collate_pairs(pairs[start:start + 2], 2), None)
        assert calls and set(calls) == {2}, calls  # all-reduce only at the step's last micro
        if rank == 0:
            policy.export(Path(out), rank=0)
    finally:
        dist.destroy_process_group()


def test_ddp_accumulation_all_reduces_once_per_step_and_matches_one_process(
        tmp_path: Path, tiny_model: Path) -> None:
    """2 DDP ranks x 2 micro-batches of 2 (no_sync on the first) give the weights of one
    process taking 4 micro-batches of 2: one averaged all-reduce per step is enough."""
    import torch.multiprocessing as mp
    from transformers import AutoTokenizer

    from ecd_ray.train.policy import Policy

    rows = pq.read_table(separable_pairs(tmp_path / "pairs", 8) / "pairs.parquet").to_pylist()
    mp.start_processes(_ddp_rank, args=(_free_port(), str(tiny_model), rows,
                                        str(tmp_path / "ddp")), nprocs=2, start_method="spawn")
    cfg = TrainConfig(model=str(tiny_model), strategy="ddp", optimizer="sgd", lr=0.5,
                      schedule="constant", clip_grad=None, loss="sft", max_length=64,
                      max_prompt_tokens=48, micro_batch_size=2, grad_accum=4)
    policy = Policy(cfg, tiny_model, total_steps=1, distributed=False)
    pairs = tokenize_table_rows(AutoTokenizer.from_pretrained(tiny_model), rows,
                                collate_config(cfg))
    for start in range(0, 8, 2):
        policy.forward_backward(collate_pairs(pairs[start:start + 2], 2), None)
    policy.export(tmp_path / "single", rank=0)
    ddp, single, init = _load(tmp_path / "ddp"), _load(tmp_path / "single"), _load(tiny_model)
    assert max((single[k] - init[k]).abs().max().item() for k in init) > 1e-4
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=2e-6)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_precomputed_reference_logprobs_equal_on_the_fly(tmp_path: Path,
                                                          tiny_model: Path) -> None:
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ecd_ray.train.collate import CollateConfig
    from ecd_ray.train.reference import add_reference_logprobs

    pairs = separable_pairs(tmp_path / "pairs", 12)
    cfg = CollateConfig(max_prompt_tokens=48, max_length=64)
    # 3 logical CPUs: the two actors' and one for the read and write tasks (the trainer keeps
    # the same headroom)
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    try:  # a pool of two 1-CPU actors (the CPU layout of 2 workers x 1 CPU) shares the blocks
        add_reference_logprobs(pairs, tmp_path / "ref", tiny_model, cfg, replicas=2, cpus=1)
    finally:
        ray.shutdown()
    shards = sorted((tmp_path / "ref").glob("*.parquet"))
    stored = pa.concat_tables(pq.read_table(p) for p in shards)
    rows = stored.to_pylist()
    assert sorted(r["pair_id"] for r in rows) == sorted(f"p{i}" for i in range(12))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        c, r, _, _ = concatenated_logprobs(model, collate_pairs(tokenize_table_rows(tok, rows, cfg),
                                                                2))
    ref_c = torch.tensor([x["ref_chosen_logp"] for x in rows], dtype=torch.float64)
    torch.testing.assert_close(ref_c, c.double(), rtol=0, atol=1e-5)
    ref_r = torch.tensor([x["ref_rejected_logp"] for x in rows], dtype=torch.float64)
    torch.testing.assert_close(ref_r, r.double(), rtol=0, atol=1e-5)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_checkpoint_problem_finds_missing_truncated_and_unsealed_parts(tmp_path: Path) -> None:
    step = tmp_path / "step_000004"
    for rank in (0, 1):
        part = tmp_path / f"part{rank}"
        (part / "state").mkdir(parents=True)
        (part / "state" / f"zero_rank_{rank}.pt").write_bytes(b"x" * (100 + rank))
        (part / "state" / "latest").write_text("state")
        _seal(part, rank, writers=2)
        for f in part.rglob("*"):  # the storage merges the ranks' folders
            if f.is_file():
                (step / f.relative_to(part)).parent.mkdir(parents=True, exist_ok=True)
                (step / f.relative_to(part)).write_bytes(f.read_bytes())
    assert checkpoint_problem(step) is None
    (step / SEAL.format(rank=1)).rename(tmp_path / "seal1")
    assert "rank 1 of 2" in checkpoint_problem(step)
    (tmp_path / "seal1").rename(step / SEAL.format(rank=1))
    (step / "state" / "zero_rank_1.pt").write_bytes(b"x" * 10)
    assert "has 10 bytes, 101 were written" in checkpoint_problem(step)
    (step / "state" / "zero_rank_1.pt").unlink()
    assert "zero_rank_1.pt is missing" in checkpoint_problem(step)
    assert "no completion record" in checkpoint_problem(tmp_path / "empty")


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no weights in {model_dir}"
    return out


@pytest.mark.slow
def test_zero3_killed_and_resumed_runs_reach_the_uninterrupted_weights(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeRO-3 over 2 workers, 8 steps, a checkpoint every 2, compared with an uninterrupted run:
    (A) rank 0's process SIGKILLed in the middle of step 5, Ray Train restarts the group from
    the step-4 checkpoint; (B) the run dies after step 5 with no retries left, part of its
    step-4 checkpoint is deleted, and a new ``train`` resumes from step 2. Both end at the
    uninterrupted run's weights and losses."""
    pairs = separable_pairs(tmp_path / "pairs", 64)  # 64 pairs / 2 workers / (2x2) = 8 steps
    # The reference model is resident in the workers: a reference stage per run (25 s each
    # here) is not what this test is about (tests/test_train_resume.py covers its reuse).
    same = ("checkpoint_every=2", "reference=resident")
    c = train(_cfg(tmp_path, tiny_model, pairs, "run_name=c", *same))
    run_c = tmp_path / "c"
    assert c["steps"] == 8 and c["resumed_from"] is None
    whole = _metrics(run_c)
    assert [m["step"] for m in whole] == list(range(1, 9))
    assert whole[-1]["loss"] < whole[0]["loss"] - 0.1  # it learns
    assert whole[-1]["rewards/accuracy"] > whole[0]["rewards/accuracy"]
    # the exported model is a plain HF folder that transformers loads, and it moved
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run_c / "model")
    init = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), init.parameters(),
                                                     strict=True))
    reference = _weights(run_c / "model")

    # (A) a lost worker: SIGKILL mid-step 5 (after its first micro-batch), one retry allowed
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5:kill")
    a = train(_cfg(tmp_path, tiny_model, pairs, "run_name=a", "max_failures=1", *same))
    assert (tmp_path / "a" / ".failed").read_text() == "killed\n"  # the kill happened
    assert a["steps"] == 8
    # Ray Train restarts from the newest checkpoint it had registered when the worker died:
    # step 4, or step 2 when step 4's report was still on its way (the kill follows it by a
    # few seconds); step 5 itself was never logged
    steps_a = [m["step"] for m in _metrics(tmp_path / "a")]
    assert steps_a in ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]), steps_a

    # (B) killed for good after step 5 (no retries), and one file of rank 1's part of the
    # newest checkpoint (step 4) deleted, as a write cut short would leave it: the same
    # command again passes over step 4 and resumes from step 2
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")
    with pytest.raises(Exception, match="injected failure"):
        train(_cfg(tmp_path, tiny_model, pairs, "run_name=b", "max_failures=0", *same))
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    step4 = tmp_path / "b" / "ray" / "attempt-0" / "step_000004"
    assert checkpoint_problem(step4) is None
    victim = max(json.loads((step4 / "ecd_complete_rank1.json").read_text())["files"])
    (step4 / victim).unlink()
    assert victim in checkpoint_problem(step4)
    b = train(_cfg(tmp_path, tiny_model, pairs, "run_name=b", *same))
    assert b["resumed_from"].endswith("step_000002")
    assert [m["step"] for m in _metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]

    for run in ("a", "b"):
        by_step = {m["step"]: m["loss"] for m in _metrics(tmp_path / run)}  # the last of a step
        for m in whole:
            assert by_step[m["step"]] == pytest.approx(m["loss"], abs=1e-6), (run, m["step"])
        got = _weights(tmp_path / run / "model")
        assert got.keys() == reference.keys()
        for name, w in reference.items():
            torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6, msg=f"{run}: {name}")


def test_zero3_chunked_logprobs_with_uneven_ranks_match_full(tmp_path: Path, tiny_model: Path
                                                             ) -> None:
    """ZeRO-3 over 2 workers whose micro-batches hold different numbers of response tokens,
    in slices of 3: no rank waits on a collective the other never calls (the demo hung so),
    and the losses equal the full-logits path's."""
    import signal

    rows = pq.read_table(separable_pairs(tmp_path / "pairs", 16) / "pairs.parquet").to_pylist()
    for i, r in enumerate(rows):  # responses of 1 to 9 words: uneven token counts per rank
        r["chosen"] = [{"role": "assistant", "content": " ".join(["yes"] * (1 + i % 9))}]
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS), tmp_path / "pairs" /
                   "pairs.parquet")

    def hung(*_: object) -> None:
        raise TimeoutError("ZeRO-3 training with chunked log-probs hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(900)
    try:
        runs = {how: train(_cfg(tmp_path, tiny_model, tmp_path / "pairs", f"run_name={how}",
                                "max_steps=2", "checkpoint_every=100",
                                # the reference forward also runs in the workers, in slices
                                "reference=resident", *extra))
                for how, extra in (("chunked", ["logprob_chunk=3"]), ("full", ["logprobs=full"]))}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert runs["chunked"]["steps"] == runs["full"]["steps"] == 2
    for a, b in zip(_metrics(tmp_path / "chunked"), _metrics(tmp_path / "full"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_ddp_strategy_trains_checkpoints_and_resumes(tmp_path: Path, tiny_model: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain-DDP path: torch AdamW + LambdaLR, rank-0 checkpoints, resume at the step."""
    pairs = separable_pairs(tmp_path / "pairs", 32)  # 32 / 2 workers / (2x2) = 4 steps
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")
    with pytest.raises(Exception, match="injected failure"):
        train(_cfg(tmp_path, tiny_model, pairs, "run_name=d", "strategy=ddp",
                   "checkpoint_every=2", "max_failures=0"))
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    summary = train(_cfg(tmp_path, tiny_model, pairs, "run_name=d", "strategy=ddp",
                         "checkpoint_every=2"))
    assert summary["resumed_from"].endswith("step_000002")
    metrics = _metrics(tmp_path / "d")
    assert [m["step"] for m in metrics] == [1, 2, 3, 3, 4]
    assert metrics[2]["loss"] == pytest.approx(metrics[3]["loss"], abs=1e-5)  # same state
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "d" / "model")
