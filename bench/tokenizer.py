"""The served model's tokenizer, as the benchmark sees it: text in, token ids out, and back.

Workloads are measured in tokens of the model under test, so the benchmark needs its tokenizer
but none of the server: a Hugging Face directory with `tokenizer.json` (read with the
`tokenizers` library), a path to a `tokenizer.json`, or a pdserve model name such as
`smollm2-135m` (resolved to a directory by `pdserve.models`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (BOS/EOS are the server's business).
        The empty string encodes to []."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; decode(encode(t)) need not equal t byte for byte, but re-encoding it
        gives about the same number of tokens (the long-prompt set cuts texts this way)."""
        ...


class HFTokenizer:
    """`tokenizers.Tokenizer` behind the `TextTokenizer` protocol."""

    def __init__(self, tokenizer_json: str | Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(name_or_path: str | Path) -> TextTokenizer:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return HFTokenizer(path)
    if not path.is_dir():
        path = _resolve_model_name(str(name_or_path))
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ValueError(f"tokenizer: no tokenizer.json in {path}")
    return HFTokenizer(tokenizer_json)


def _resolve_model_name(name: str) -> Path:
    try:
        from pdserve.models import resolve_model
    except ImportError as e:
        raise ValueError(f"tokenizer: {name!r} is not a directory or file, and pdserve.models is unavailable") from e
    return Path(resolve_model(name))
