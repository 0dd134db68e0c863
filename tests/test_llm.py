"""The offline API's construction: options as a frozen dataclass, or the same names as keywords."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from pdserve.llm import LLMOptions

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_keywords_and_options_build_the_same_engine(tiny_llama_dir: Path) -> None:
    by_keyword = LLM(str(tiny_llama_dir), device="cpu", block_size=8, max_model_len=128, max_num_seqs=4,
                     num_threads=1)
    by_options = LLM(str(tiny_llama_dir), LLMOptions(device="cpu", block_size=8, max_model_len=128, max_num_seqs=4,
                                                     num_threads=1))
    assert by_keyword.options == by_options.options
    assert by_keyword.engine.layout.block_size == 8 and by_keyword.max_model_len == 128
    prompt = [[5, 9, 17, 3]]
    assert by_keyword.generate(prompt, GREEDY)[0].token_ids == by_options.generate(prompt, GREEDY)[0].token_ids


def test_keywords_override_options(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), LLMOptions(device="cpu", block_size=8, num_threads=1), block_size=16)
    assert llm.options.block_size == 16 and llm.options.device == "cpu"
    assert llm.engine.layout.block_size == 16


@pytest.mark.parametrize("kwargs, field", [({"tensor_parallel_size": 2}, "tensor_parallel_size"),
                                           ({"block_sise": 8}, "block_sise"),
                                           ({"block_size": 0}, "block_size")])
def test_bad_options_name_the_field(tiny_llama_dir: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LLM(str(tiny_llama_dir), device="cpu", num_threads=1, **kwargs)


def test_options_are_frozen() -> None:
    with pytest.raises(AttributeError):
        LLMOptions().block_size = 8  # type: ignore[misc]
