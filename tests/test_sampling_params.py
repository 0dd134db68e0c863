"""`SamplingParams` accepts what vLLM's accepts and stores one canonical, hashable form."""

from __future__ import annotations

import pytest

from pdserve import SamplingParams


def test_lists_strings_and_none_become_tuples() -> None:
    assert SamplingParams(stop=["\n", "###"]).stop == ("\n", "###")
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=None, stop_token_ids=None) == SamplingParams()
    assert SamplingParams(stop_token_ids=[2, 7]).stop_token_ids == (2, 7)
    assert SamplingParams(temperature=0, top_p=1, max_tokens=None).max_tokens is None
    hash(SamplingParams(stop=["x"], stop_token_ids=[1]))  # usable as a key, like any frozen request field


@pytest.mark.parametrize("kwargs, field", [({"stop": [""]}, "stop"), ({"stop": [1]}, "stop"),
                                           ({"stop_token_ids": [-1]}, "stop_token_ids"),
                                           ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
                                           ({"top_p": 0}, "top_p")])
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)
