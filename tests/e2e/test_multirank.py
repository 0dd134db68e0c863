"""Whole system with a multi-rank instance: SmolLM2 (9 heads / 3 KV heads) served by a prefill
instance of tp=3 Ray actors in lock-step, feeding a tp=1 decode instance through the KV transfer
(each prefill rank exports its third of the heads). Tokens must equal the offline engine's."""

from __future__ import annotations

import pytest

from pdserve.config import EngineConfig, PoolConfig, RouterConfig, ServingConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 12


def test_tp3_prefill_instance_serves_the_offline_engine_tokens(ray_cluster: None) -> None:
    from openai import OpenAI
    from pdserve.placement.launch import launch

    from pdserve import LLM, SamplingParams
    from pdserve.models import resolve_model
    from pdserve.tokenizer import Tokenizer

    llm = LLM("smollm2-135m", num_threads=1, device="cpu")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    tok = Tokenizer.from_dir(resolve_model("smollm2-135m"))
    cfg = ServingConfig(engine=EngineConfig(device="cpu"), prefill=PoolConfig(tp=3, num_cpus=0.5),
                        decode=PoolConfig(num_cpus=0.5),
                        router=RouterConfig(port=0))
    deployment = launch(cfg)
    try:
        assert [len(fs) for fs in deployment.followers.values()] == [2]  # ranks 1, 2 of prefill-0
        client = OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt, out in zip(PROMPTS, outs):
            resp = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0.0, extra_body={"ignore_eos": True})
            assert resp.choices[0].text == tok.decode(out.token_ids), prompt
    finally:
        deployment.shutdown()
