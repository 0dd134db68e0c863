"""Addresses tests bind KV endpoints on: one machine, loopback."""

from pdserve.kvtransfer.listen import Listen

LOCAL = Listen.on("127.0.0.1")
