"""Prefix-cache block keys: the one scheme engines (which cache blocks) and the router (which guesses
where they are cached) both use. A leaf contract: no torch, nothing of pdserve.

Block i of a token sequence is named by `h_i = blake2b-128(h_{i-1} || tokens of block i)`, with
`h_{-1}` = the namespace (model identity). A key therefore names the whole prefix up to and
including its block, and only full blocks have keys.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockKey = bytes


def chain_keys(token_ids: Sequence[int], block_size: int, namespace: str = "",
               keys: list[BlockKey] | None = None) -> list[BlockKey]:
    """Keys of every full block of `token_ids` (len(token_ids) // block_size of them).

    `keys`, if given, holds the keys of a prefix already computed (for the same tokens); it is
    extended in place and returned, so a growing sequence hashes each block once.
    """
    keys = [] if keys is None else keys
    parent = keys[-1] if keys else namespace.encode()
    for i in range(len(keys), len(token_ids) // block_size):
        block = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys
