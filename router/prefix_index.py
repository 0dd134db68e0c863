"""The router's approximate index of which prompt prefixes each instance holds in its prefix cache.

Built from the router's own dispatch history, as SGLang's cache-aware router does (no messages from
the instances): a request sent to an instance leaves its prompt's full blocks there, and a finished
decode leaves its prompt and output blocks. Each instance's entry is an LRU of block keys
(`pdserve.prefix_keys`) capped at the instance's KV-cache size, so the guess forgets in about the
order the instance's own LRU eviction does. It can be wrong (an instance evicts early under
pressure, or restarts); a wrong guess costs only a cache miss, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdserve.prefix_keys import BlockKey


class PrefixIndex:
    def __init__(self) -> None:
        self._held: dict[str, OrderedDict[BlockKey, None]] = {}
        self._capacity: dict[str, int] = {}

    def set_capacity(self, instance: str, num_blocks: int) -> None:
        """The instance's KV cache holds `num_blocks` blocks (from its stats); trims the oldest keys."""
        self._capacity[instance] = max(0, num_blocks)
        self._trim(instance)

    def record(self, instance: str, keys: Sequence[BlockKey]) -> None:
        """`keys` (a prefix's chain, in order) are now cached on `instance`, most recently used."""
        held = self._held.setdefault(instance, OrderedDict())
        for key in keys:
            held[key] = None
            held.move_to_end(key)
        self._trim(instance)

    def hit_blocks(self, instance: str, keys: Sequence[BlockKey]) -> int:
        """How many leading blocks of `keys` the instance is believed to hold."""
        held = self._held.get(instance)
        n = 0
        while held is not None and n < len(keys) and keys[n] in held:
            n += 1
        return n

    def forget(self, instance: str) -> None:
        """The instance is gone or restarted: it holds nothing."""
        self._held.pop(instance, None)

    def _trim(self, instance: str) -> None:
        held, cap = self._held.get(instance), self._capacity.get(instance)
        while held and cap is not None and len(held) > cap:
            held.popitem(last=False)
