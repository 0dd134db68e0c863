"""The torch-free tokenizer against transformers' AutoTokenizer on SmolLM2, and the incremental detokenizer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from pdserve.tokenizer import IncrementalDetokenizer, Tokenizer, validate_messages

TEXTS = [
    "Hello world", "", " ", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n\n",
    "Numbers 12345 and 3.14159 and 1,000,000", "I'm sure they'll say it's fine, don't you think?",
    "naïve café résumé Ångström", "你好，世界！日本語のテキスト", "Emoji: 😀👍🏽🇺🇸 and ❤️",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "def f(x):\n    return x ** 2  # ok",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße! 😀"},
     {"role": "assistant", "content": "Hallo."}, {"role": "user", "content": "12 + 30?"}],
]


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("special", [True, False])
def test_encode_matches_transformers(tok: Tokenizer, hf: Any, special: bool) -> None:
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), text


def test_decode_matches_transformers(tok: Tokenizer, hf: Any) -> None:
    rng = random.Random(0)
    streams = [tok.encode(t) for t in TEXTS] + [[rng.randrange(tok.vocab_size) for _ in range(40)] for _ in range(20)]
    for ids in streams:
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(tok: Tokenizer, hf: Any, chat: list, gen: bool) -> None:
    text = tok.apply_chat_template(chat, add_generation_prompt=gen)
    assert text == hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    expected = hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
    assert tok.encode_chat(chat, add_generation_prompt=gen) == list(expected)
    assert text.endswith("<|im_start|>assistant\n") == gen


def test_special_ids_and_sizes(tok: Tokenizer, hf: Any) -> None:
    assert tok.eos_token_ids == (hf.eos_token_id,) == (2,)
    assert tok.bos_token_id == hf.bos_token_id == 1
    assert tok.vocab_size == len(hf) == 49152


@pytest.mark.parametrize("bad, field", [
    ("hi", "messages"), ([], "messages"), (["hi"], r"messages\[0\]"),
    ([{"content": "x"}], r"messages\[0\]\.role"), ([{"role": "user"}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], r"messages\[0\]\.content"),
])
def test_bad_messages_name_the_field(tok: Tokenizer, bad: object, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}"):
        tok.apply_chat_template(bad)  # type: ignore[arg-type]


def test_text_parts_are_joined() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert validate_messages(parts) == [{"role": "user", "content": "ab"}]


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tok.backend, {**tok.config, "chat_template": template}, {"eos_token_id": 2})


def test_template_exceptions_and_sandbox_escapes_are_value_errors(tok: Tokenizer) -> None:
    strict = _with_template(tok, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                                 "{% endif %}{{ bos_token }}{{ messages[0]['content'] | tojson }}{{ eos_token }}")
    assert strict.apply_chat_template([{"role": "user", "content": "é"}]) == '<|im_start|>"é"<|im_end|>'
    with pytest.raises(ValueError, match="messages: first must be user"):
        strict.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="^messages: "):
        _with_template(tok, "{{ messages.append(1) }}").apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="^messages: "):
        _with_template(tok, "{{ ''.__class__.__mro__ }}").apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tok.backend, {}, {}).apply_chat_template([{"role": "user", "content": "x"}])


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], stop: tuple[str, ...] = (),
            rng: random.Random | None = None) -> tuple[list[str], bool, str]:
    """Feeds ids in chunks of 1 (or random 1..3); returns the deltas, hit_stop and the flushed tail."""
    det = IncrementalDetokenizer(tok, prompt, stop)
    deltas, i, hit = [], 0, False
    while i < len(ids) and not hit:
        n = rng.randrange(1, 4) if rng else 1
        delta, hit = det.add(ids[i:i + n])
        deltas.append(delta)
        i += n
    tail = "" if hit else det.flush()
    assert det.text == "".join(deltas) + tail
    return deltas, hit, tail


def test_incremental_equals_full_decode_on_random_streams(tok: Tokenizer) -> None:
    rng = random.Random(1)
    # Byte tokens of multi-byte characters split across ids, and random ids anywhere in the vocabulary.
    unicode_ids = tok.encode("Grüße aus Köln! 日本語のテキスト 😀👍🏽 🇺🇸 fin")
    streams = [unicode_ids] + [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
                               for _ in range(100)]
    streams += [[rng.choice(unicode_ids) for _ in range(30)] for _ in range(50)]
    for ids in streams:
        deltas, hit, tail = _stream(tok, tok.encode("The prompt says:"), ids, rng=rng)
        assert not hit and "".join(deltas) + tail == tok.decode(ids)


def test_incomplete_characters_are_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("😀😀 日本")
    deltas, _, tail = _stream(tok, [], ids)
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) + tail == "😀😀 日本"
    assert len(ids) > len([d for d in deltas if d])  # some tokens completed no character on their own


def _char_ids(tok: Tokenizer, text: str) -> list[int]:
    """One or more tokens per character, so a stop string is always split across tokens."""
    return [i for ch in text for i in tok.encode(ch)]


def test_stop_string_split_across_tokens_is_cut_and_never_emitted(tok: Tokenizer) -> None:
    deltas, hit, _ = _stream(tok, [], _char_ids(tok, "abc STAR STOP and more"), stop=("STOP",))
    assert hit and "".join(deltas) == "abc STAR "
    # "S", "ST" of STAR were held back until "A" ruled the stop string out; "STO" never came out.
    assert "".join(deltas[:6]) == "abc " and "STAR" in "".join(deltas[:9])


def test_earliest_stop_wins_and_later_adds_are_inert(tok: Tokenizer) -> None:
    det = IncrementalDetokenizer(tok, [], ("world", "lo w", "xyz"))
    delta, hit = det.add(tok.encode("Hello world, xyz"))
    assert (delta, hit) == ("Hel", True)
    assert det.add(tok.encode("more")) == ("", True) and det.flush() == "" and det.text == "Hel"


def test_held_back_stop_prefix_is_flushed_at_the_end(tok: Tokenizer) -> None:
    deltas, hit, tail = _stream(tok, [], _char_ids(tok, "done\n\nUs"), stop=("\n\nUser:",))
    assert not hit and "".join(deltas) == "done" and tail == "\n\nUs"


def test_stop_string_with_multibyte_characters(tok: Tokenizer) -> None:
    ids = tok.encode("Voilà, c'est fini. Très bien!")
    deltas, hit, _ = _stream(tok, [], ids, stop=("è",))
    assert hit and "".join(deltas) == "Voilà, c'est fini. Tr"
