"""Text ⇄ token ids for the router and the engine: a model directory's tokenizer and chat template.

Torch-free and transformers-free (the `tokenizers` library plus jinja2), so the router process
stays light. `Tokenizer` encodes prompts and renders chat templates the way transformers does;
`IncrementalDetokenizer` turns a request's stream of output ids into text deltas, holding back
incomplete UTF-8 and anything that could still become a stop string.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

Message = dict[str, Any]


class Tokenizer:
    """A model directory's tokenizer.json, tokenizer_config.json and generation_config.json."""

    def __init__(self, backend: _HFTokenizer, config: dict[str, Any], generation: dict[str, Any]) -> None:
        self.backend = backend
        self.config = config
        self.chat_template: str | None = _template_text(config.get("chat_template"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._id(self.bos_token)
        if self.bos_token_id is None and isinstance(generation.get("bos_token_id"), int):
            self.bos_token_id = generation["bos_token_id"]
        eos = generation.get("eos_token_id")
        ids = list(eos) if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        if self._id(self.eos_token) is not None:
            ids.append(self._id(self.eos_token))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))  # ordered, no duplicates

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"model: {str(path)!r} has no tokenizer.json")

        def read(name: str) -> dict[str, Any]:
            return json.loads((path / name).read_text()) if (path / name).is_file() else {}

        return cls(_HFTokenizer.from_file(str(path / "tokenizer.json")), read("tokenizer_config.json"),
                   read("generation_config.json"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"prompt: expected a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat, rendered as transformers renders tokenizer_config's template."""
        if self.chat_template is None:
            raise ValueError("messages: this model has no chat template; send a plain prompt instead")
        checked = validate_messages(messages)
        import jinja2

        try:
            return _compile(self.chat_template).render(
                messages=checked, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                unk_token=_token_text(self.config.get("unk_token")) or "",
                pad_token=_token_text(self.config.get("pad_token")) or "",
            )
        except jinja2.TemplateError as e:  # raise_exception() in the template: the chat is malformed
            raise ValueError(f"messages: {e}") from e

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the special tokens itself, so none are added on top (as transformers does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def _id(self, token: str | None) -> int | None:
        return self.backend.token_to_id(token) if token else None


def validate_messages(messages: object) -> list[Message]:
    """OpenAI-style messages → plain {role, content: str} dicts; a list of text parts is joined."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role: expected a non-empty string")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string or a list of text parts")
        out.append({**m, "role": role, "content": content})
    return out


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """Chat templates are untrusted code from a model repo: render them sandboxed, as transformers does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        from jinja2 import TemplateError

        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_text(token: object) -> str | None:
    """tokenizer_config writes special tokens either as strings or as AddedToken dicts."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _template_text(template: object) -> str | None:
    """A single template, or the "default" one of a named list ([{name, template}, ...])."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, so word boundaries come out right


class IncrementalDetokenizer:
    """One request's output ids → text deltas, cut at the first stop string.

    Per new token it decodes a short window [prefix_offset, end) and emits what the window adds
    beyond [prefix_offset, read_offset) (vLLM's scheme): decoding windows keeps spaces and merged
    characters right, and a window ending in U+FFFD (an incomplete UTF-8 sequence split over
    byte-fallback tokens) emits nothing until a later token completes it.

    Stop strings: decoded text waits in `_pending` while its tail could still begin a stop
    string; text before a found stop string is emitted and the stop string never is. Once a stop
    string is found, `finished` is True and further `add` calls return ("", True).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._ids = list(prompt_ids)
        #  _ids: | prompt ... | outputs ... |
        #        ^prefix_offset  ^read_offset: text of [prefix, read) has been emitted (or pending)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
        self._pending = ""
        self.text = ""  # everything emitted so far
        self.finished = False

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Feed new output ids; returns (text to emit now, whether a stop string was hit)."""
        if self.finished:
            return "", True
        for tid in token_ids:
            self._ids.append(tid)
            self._pending += self._decode_step()
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of a request (eos, max_tokens): release the held-back text, incomplete tail included."""
        if self.finished:
            return ""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        self._pending += self._decode(self._prefix_offset, len(self._ids))[len(prefix):]
        self._prefix_offset = self._read_offset = len(self._ids)
        delta, _ = self._release(final=True)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

    def _decode_step(self) -> str:
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix):]

    def _release(self, final: bool) -> tuple[str, bool]:
        pending = self._pending
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._pending, self.finished = pending[:min(hits)], "", True
        else:
            keep = 0 if final else _stop_prefix_len(pending, self.stop)
            out, self._pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out, self.finished


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
