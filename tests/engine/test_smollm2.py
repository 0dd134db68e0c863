"""The real model: SmolLM2-135M-Instruct (converted from the bundled GGUF) against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from pdserve import LLM, SamplingParams
from pdserve.models import resolve_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m", num_threads=2, device="cpu")


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()


def _hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """transformers' greedy decoding with EOS disabled (our side runs with ignore_eos)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         generation_config=GenerationConfig(eos_token_id=None, pad_token_id=0))
    return out[0, len(ids):].tolist()


def test_greedy_tokens_match_transformers_on_smollm2(llm: LLM, hf_model: torch.nn.Module) -> None:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt)
        assert out.token_ids == _hf_greedy(hf_model, ids, 32)
        assert len(out.token_ids) == 32 and out.finish_reason == "length"


def test_chat_answers_and_stops_at_eos(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=48))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.engine.eos_token_ids


def test_stop_string_cuts_text(llm: LLM) -> None:
    full = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert "return" in full.text
    cut = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=24, stop=("return",)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index("return")]


def test_vllm_style_arguments(llm: LLM) -> None:
    """What a vLLM user writes works unchanged: list stops, None, prompt dicts, per-prompt params."""
    prompt = PROMPTS[0]  # greedy: " Paris.\n\n..."
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].text
    line = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop=["\n"]))[0]
    assert line.finish_reason == "stop" and line.text == full[: full.index("\n")] and line.text.strip()
    ids = llm.tokenizer.encode(PROMPTS[0])
    by_ids, by_text = llm.generate([{"prompt_token_ids": ids}, {"prompt": PROMPTS[0]}],
                                   SamplingParams(temperature=0, max_tokens=4, stop=None, stop_token_ids=None))
    assert by_ids.token_ids == by_text.token_ids and len(by_ids.token_ids) == 4
    short, long = llm.generate([PROMPTS[0], PROMPTS[0]], [SamplingParams(temperature=0, max_tokens=2),
                                                          SamplingParams(temperature=0, max_tokens=6)])
    assert (len(short.token_ids), long.token_ids[:2]) == (2, short.token_ids)
    unbounded = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=None), use_tqdm=False)[0]
    assert unbounded.finish_reason in ("stop", "length") and len(unbounded.token_ids) >= 1
    with pytest.raises(ValueError, match="sampling_params: 1 given for 2 prompts"):
        llm.generate(PROMPTS[:2], [SamplingParams()])
