"""`kvtransfer.tls`: the control RPCs and the grpc transport's data run over TLS with a self-signed
certificate made here (openssl); a plaintext peer cannot talk to a TLS sender."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pdserve.config import ConfigError, KVTLSConfig, KVTransferConfig, ServingConfig
from pdserve.engine.kv_cache import BlockAllocator, KVLayout, KVPool
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.kvtransfer.reshard import gather_slab, token_slots
from pdserve.kvtransfer.types import TransferStatus
from tests.net import LOCAL


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> KVTLSConfig:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    cert = str(d / "cert.pem")
    return KVTLSConfig(cert=cert, key=str(d / "key.pem"), ca=cert)  # self-signed: the cert is its own CA


def _pool(seed: int) -> tuple[KVPool, BlockAllocator]:
    pool = KVPool(KVLayout(2, 2, 8, 4), 16)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return pool, BlockAllocator(16)


def _kv(pool: KVPool, blocks: list[int], n: int) -> torch.Tensor:
    slots = token_slots(blocks, pool.layout.block_size, n, pool.device)
    return torch.stack([gather_slab(pool, i, slots, slice(None)) for i in range(pool.layout.num_layers)])


def test_a_pull_over_tls_moves_the_kv_and_a_plaintext_receiver_is_refused(tls: KVTLSConfig) -> None:
    cfg = KVTransferConfig(transport="grpc", timeout_s=5, tls=tls)
    (sp, sa), (dp, da) = _pool(0), _pool(1)
    tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
    plain = make_receiver(KVTransferConfig(transport="grpc", timeout_s=5), dp, listen=LOCAL)
    try:
        blocks, dst = sa.allocate(3), da.allocate(3)
        handle = tx.export("r1", blocks, 10)
        bad = plain.pull(handle, dst)
        assert plain.wait(bad, 10) is TransferStatus.FAILED
        # refused on whichever plaintext channel meets the TLS server first: the control RPC, or the
        # data stream (a failing piece fails the pull at once; kvtransfer/receiver.py)
        error = plain.poll(bad)[1] or ""
        assert "control rpc failed" in error or "grpc UNAVAILABLE" in error, error
        xfer = rx.pull(handle, dst)
        assert rx.wait(xfer, 10) is TransferStatus.DONE, rx.poll(xfer)
        assert torch.equal(_kv(sp, blocks, 10), _kv(dp, dst, 10))
    finally:
        for end in (plain, rx, tx):
            end.close()


def test_tls_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"^kvtransfer\.tls\.ca: must name a PEM file"):
        ServingConfig.from_dict({"kvtransfer": {"tls": {"cert": "c.pem", "key": "k.pem"}}})
    with pytest.raises(ConfigError, match=r"^kvtransfer\.tls: the torch transport"):
        ServingConfig.from_dict({"kvtransfer": {"transport": "torch", "tls": {"cert": "c", "key": "k", "ca": "a"}}})
    cfg = ServingConfig.from_dict({"kvtransfer": {"tls": {"cert": "c", "key": "k", "ca": "a"}}})
    assert cfg.kvtransfer.tls == KVTLSConfig("c", "k", "a")


def test_missing_tls_files_fail_the_start_and_leave_nothing_open(tmp_path: Path) -> None:
    import threading

    cfg = KVTransferConfig(transport="grpc", tls=KVTLSConfig(cert=str(tmp_path / "no.pem"), key="k", ca="a"))
    sp, sa = _pool(0)
    before = set(threading.enumerate())  # by identity: an earlier test's thread may end meanwhile
    with pytest.raises(FileNotFoundError):
        make_sender(cfg, sp, sa, listen=LOCAL)
    assert not set(threading.enumerate()) - before
