"""An instance's prefix cache as the simulator models it: which conversation histories and shared
prefixes it holds, in tokens, evicted least recently used.

The engine's cache holds full blocks keyed by a hash chain of token ids (engine/prefix_cache.py);
the simulator knows no token ids, only that turn k's prompt begins with turn k−1's prompt and
answer and that requests of one `shared_prefix_len` begin with the same tokens. So an entry is
per session (how many tokens of its history the instance holds) or per shared prefix, and a hit is
that many tokens rounded down to whole blocks, at most the prompt less one token (the engine always
computes the last prompt token to sample from it). Capacity: the instance's KV tokens less those
its running requests reserve at the moment something is cached (cached blocks live in free memory).
Approximation, said: an entry is evicted whole (the engine evicts a chain block by block, tail
first, which leaves a shorter prefix), and blocks shared between a running request and the cache
are counted once in the reservation and once in the cache.
"""

from __future__ import annotations

from collections import OrderedDict

BLOCK_SIZE = 16  # tokens per KV block (engine default)


class PrefixCacheModel:
    __slots__ = ("capacity", "held", "total")

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = capacity_tokens
        self.held: OrderedDict[tuple[int, int], int] = OrderedDict()  # (kind, id) -> tokens; 0 = session, 1 = shared
        self.total = 0

    def hit(self, session: int, reusable: int, shared_len: int, prompt_len: int) -> int:
        """Prompt tokens a request would find cached here (whole blocks, at most prompt_len − 1)."""
        h = min(self.held.get((0, session), 0), reusable)
        if shared_len:
            h = max(h, min(self.held.get((1, shared_len), 0), shared_len))
        h = min(h, prompt_len - 1)
        return h - h % BLOCK_SIZE

    def insert(self, session: int, tokens: int, shared_len: int, reserved: int) -> None:
        """The instance now holds `tokens` of `session`'s history (and its shared prefix), most
        recently used; older entries go while the cache exceeds capacity − `reserved`."""
        self._put((0, session), tokens)
        if shared_len:
            self._put((1, shared_len), shared_len)
        limit = max(0, self.capacity - reserved)
        held = self.held
        while self.total > limit and held:
            self.total -= held.popitem(last=False)[1]

    def _put(self, key: tuple[int, int], tokens: int) -> None:
        old = self.held.pop(key, 0)
        self.held[key] = max(old, tokens)
        self.total += self.held[key] - old
