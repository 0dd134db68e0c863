"""Delta pulls: with `first_token`, only the tokens the receiver does not hold travel (prefix caching)."""

from __future__ import annotations

import torch

from pdserve.config import KVTransferConfig
from pdserve.kvtransfer.factories import make_receiver, make_sender
from tests.kvtransfer.test_sender_receiver import DONE, FAILED, _drain, _kv, _pool, _wait, cfg  # noqa: F401
from tests.net import LOCAL


def test_delta_pull_moves_only_the_suffix(cfg: KVTransferConfig, closing: list) -> None:  # noqa: F811
    (sp, sa), (dp, da) = _pool(block_size=8), _pool(block_size=4, seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    closing += [rx, tx]
    blocks = sa.allocate(5)
    handle, again = tx.export("r1", blocks, 37), tx.export("r2", blocks, 37)  # a pull releases its export
    sa.free(blocks)  # the engine's own reference; the exports keep them
    dst = da.allocate(10)
    before = _kv(dp, dst, 37).clone()
    full = rx.pull(handle, dst[:10])
    assert _wait(rx, full) == (DONE, None)
    dst2 = da.allocate(10)
    held = _kv(dp, dst2, 37).clone()
    delta = rx.pull(again, dst2, first_token=20)
    assert _wait(rx, delta) == (DONE, None)
    got, src = _kv(dp, dst2, 37), _kv(sp, blocks, 37)
    assert torch.equal(got[:, :, 20:], src[:, :, 20:])  # the suffix arrived
    assert torch.equal(got[:, :, :20], held[:, :, :20])  # the prefix the receiver holds was not touched
    assert not torch.equal(before, src)  # (the destination did not hold the source's KV by chance)
    assert 0 < rx.nbytes(delta) < 0.6 * rx.nbytes(full)  # 17 of 37 tokens' bytes, plus framing
    _drain(tx, 2)
    assert sa.num_free == 64


def test_first_token_outside_the_handle_fails_as_a_value(cfg: KVTransferConfig, closing: list) -> None:  # noqa: F811
    (sp, sa), (dp, da) = _pool(), _pool(seed=1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    closing += [rx, tx]
    handle = tx.export("r1", sa.allocate(2), 16)
    status, error = _wait(rx, rx.pull(handle, da.allocate(2), first_token=16))
    assert status is FAILED and "first_token 16" in error
