"""Instruction-following evaluation: generate (any engine) or read responses, score, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ecd_ray.config import EngineConfig
from ecd_ray.evaluate.ifeval import (
    EvalPrompt,
    read_prompts,
    read_responses,
    score,
    write_responses,
)
from ecd_ray.evaluate.report import write_report

__all__ = ["evaluate", "generate_responses", "read_prompts", "score"]


def generate_responses(prompts: list[EvalPrompt], engine_cfg: EngineConfig, seed: int = 0
                       ) -> list[str]:
    """Answer each prompt as a single-turn chat with the configured engine (in-process)."""
    from ecd_ray.engines import ChatRequest, Sampling, build_engine, request_seed

    engine = build_engine(engine_cfg, seed=seed)
    sampling = Sampling(temperature=engine_cfg.temperature, top_p=engine_cfg.top_p,
                        max_new_tokens=engine_cfg.max_new_tokens)
    requests = [ChatRequest(f"eval:{p.key}", [{"role": "user", "content": p.prompt}],
                            Sampling(**{**sampling.to_dict(),
                                        "seed": request_seed(seed, f"eval:{p.key}")}))
                for p in prompts]
    try:
        return [r.text for r in engine.generate(requests)]
    finally:
        engine.close()


def evaluate(prompts_path: Path, out_dir: Path, *, engine_cfg: EngineConfig | None = None,
             responses_path: Path | None = None, title: str | None = None) -> dict[str, Any]:
    """Score ``engine_cfg.model`` (or a file of existing responses) on ``prompts_path``."""
    prompts = read_prompts(prompts_path)
    started = time.time()
    if responses_path is not None:
        responses = read_responses(responses_path, prompts)
        source = str(responses_path)
    elif engine_cfg is not None:
        responses = generate_responses(prompts, engine_cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_responses(out_dir / "responses.jsonl", prompts, responses)
        source = engine_cfg.model
    else:
        raise ValueError("evaluate needs a model to generate with or a responses file")
    result = score(prompts, responses)
    result.update(model=source, prompts_file=str(prompts_path),
                  elapsed_s=round(time.time() - started, 1))
    result["files"] = {k: str(v) for k, v in
                       write_report(result, out_dir, title or Path(source).name).items()}
    return result
