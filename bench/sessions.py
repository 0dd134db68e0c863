"""Multi-turn chat sessions: ShareGPT conversations replayed turn by turn, the prompt being the history.

A `ChatSession` is an optional system prompt and a list of turns; turn k sends the system prompt,
every earlier user message with the answer the server actually gave, and user message k, and asks
for `output_len` tokens (with `ignore_eos`, the length of the dataset's reference answer, capped).
So turn k's prompt begins with turn k−1's prompt and answer: the prefix a prefix cache can reuse.

Workloads:
- `sharegpt`: the leading user/assistant pairs of ShareGPT V3 conversations (the dataset's turns
  alternate user, assistant), cut to `max_turns` and to what fits `max_context_len`.
- `system-prompt`: the same sessions behind one long system prompt shared by every session (real
  text: a long ShareGPT answer cut to `system_prompt_len` tokens), as agents and assistants send.

Lengths are in tokens of the served model's tokenizer without the chat template, which adds a few
tokens per message (counted by `TEMPLATE_TOKENS_PER_MESSAGE` when sessions are cut to fit).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from pdserve.bench.tokenizer import TextTokenizer

SESSION_WORKLOADS = ("sharegpt", "system-prompt")
TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers and separators of a chat template (ChatML: ~5)


@dataclass(frozen=True)
class SessionTurn:
    user: str
    user_len: int  # tokens of the user message
    output_len: int  # tokens the answer must have (max_tokens with ignore_eos)


@dataclass(frozen=True)
class ChatSession:
    turns: tuple[SessionTurn, ...]
    system: str = ""
    system_len: int = 0

    def prompt_len(self, k: int) -> int:
        """Tokens of turn k's prompt, template overhead included (an estimate: the history's answers
        are the server's, `output_len` tokens each)."""
        messages = 2 * k + 1 + (1 if self.system else 0)
        history = sum(t.user_len + t.output_len for t in self.turns[:k])
        return self.system_len + history + self.turns[k].user_len + messages * TEMPLATE_TOKENS_PER_MESSAGE

    def new_len(self, k: int) -> int:
        """Tokens of turn k's prompt that turn k−1's prompt and answer do not already hold."""
        return self.prompt_len(k) - (self.prompt_len(k - 1) + self.turns[k - 1].output_len if k else 0)

    def salted(self, salt: str) -> ChatSession:
        """The same session with `salt` put before its first message (the system prompt when there is
        one, so sessions salted alike still share it): replaying a trace again with another salt
        finds nothing of the last replay in a prefix cache. Lengths stay the unsalted estimates."""
        if self.system:
            return replace(self, system=salt + self.system)
        return replace(self, turns=(replace(self.turns[0], user=salt + self.turns[0].user),) + self.turns[1:])


@dataclass(frozen=True)
class SessionSpec:
    name: str = "sharegpt"
    num_sessions: int = 20
    max_turns: int = 4
    max_context_len: int = 1024  # every turn's prompt + answer stays below this
    max_user_len: int = 256  # longer user messages are cut to this many tokens
    max_output_len: int = 128
    system_prompt_len: int = 0  # `system-prompt` only: tokens of the shared system prompt
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in SESSION_WORKLOADS:
            raise ValueError(f"sessions: {self.name!r} is not one of {', '.join(SESSION_WORKLOADS)}")
        for name in ("num_sessions", "max_turns", "max_context_len", "max_user_len", "max_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.system_prompt_len < 0 or (self.name == "system-prompt") != (self.system_prompt_len > 0):
            raise ValueError(f"system_prompt_len: must be > 0 exactly for the system-prompt workload, "
                             f"got {self.system_prompt_len} for {self.name!r}")


def build_sessions(spec: SessionSpec, tokenizer: TextTokenizer) -> list[ChatSession]:
    """`spec.num_sessions` sessions of ≥ 2 turns each, the same ones for the same spec and tokenizer."""
    from pdserve.bench.sharegpt import load_conversations

    conversations = [c for c in load_conversations(min_turns=4)]
    random.Random(spec.seed).shuffle(conversations)
    system, system_len = _system_prompt(spec, tokenizer, conversations)
    out: list[ChatSession] = []
    for turns in conversations:
        session = _session(turns, spec, tokenizer, system, system_len)
        if session is not None:
            out.append(session)
            if len(out) == spec.num_sessions:
                return out
    raise ValueError(f"sessions: only {len(out)} conversations fit max_context_len={spec.max_context_len}")


def _session(texts: tuple[str, ...], spec: SessionSpec, tokenizer: TextTokenizer, system: str,
             system_len: int) -> ChatSession | None:
    turns: list[SessionTurn] = []
    for user, answer in zip(texts[0::2], texts[1::2]):
        ids = tokenizer.encode(user)[:spec.max_user_len]
        output_len = min(spec.max_output_len, max(1, len(tokenizer.encode(answer))))
        if len(ids) < 1:
            break
        candidate = ChatSession(tuple(turns) + (SessionTurn(tokenizer.decode(ids), len(ids), output_len),),
                                system, system_len)
        k = len(candidate.turns) - 1
        if candidate.prompt_len(k) + output_len >= spec.max_context_len:
            break
        turns = list(candidate.turns)
        if len(turns) == spec.max_turns:
            break
    return ChatSession(tuple(turns), system, system_len) if len(turns) >= 2 else None


def _system_prompt(spec: SessionSpec, tokenizer: TextTokenizer,
                   conversations: list[tuple[str, ...]]) -> tuple[str, int]:
    if not spec.system_prompt_len:
        return "", 0
    for turns in conversations:  # the first answer long enough, cut to the asked length
        ids = max((tokenizer.encode(t) for t in turns[1::2]), key=len)
        if len(ids) >= spec.system_prompt_len:
            text = tokenizer.decode(ids[:spec.system_prompt_len])
            return text, len(tokenizer.encode(text))
    raise ValueError(f"system_prompt_len: no ShareGPT answer has {spec.system_prompt_len} tokens")
