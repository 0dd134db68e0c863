"""Host staging (kvtransfer/staging.py): a no-op off CUDA; on CUDA the parts come back complete in
pinned memory from a side stream that waited only for the layer's event."""

from __future__ import annotations

import pytest
import torch

from pdserve.kvtransfer.staging import HostStager, LayerEvents


def test_off_cuda_parts_pass_through_untouched() -> None:
    events, stager = LayerEvents(torch.device("cpu"), 4), HostStager(torch.device("cpu"))
    events.record(2)
    parts = [torch.arange(6), torch.ones(2, 3)]
    out = stager.to_host(events.get(2), lambda: parts)
    assert events.get(2) is None and all(a is b for a, b in zip(out, parts))
    assert all(a is b for a, b in zip(stager.on_device(None, lambda: parts), parts))


def _layer_behind_a_long_forward() -> tuple[LayerEvents, HostStager, torch.Tensor, torch.Tensor]:
    """A long forward on the compute stream, then the layer's KV write and its event."""
    dev = torch.device("cuda", torch.cuda.current_device())
    events, stager = LayerEvents(dev, 1), HostStager(dev)
    kv = torch.zeros(4096, 4096, device=dev)
    big = torch.randn(4096, 4096, device=dev)
    for _ in range(20):
        big = big @ big.T / 4096
    kv.copy_(big)
    events.record(0)
    return events, stager, kv, big


@pytest.mark.gpu
def test_on_cuda_the_side_stream_waits_for_the_layer_and_returns_pinned_host_parts() -> None:
    events, stager, kv, big = _layer_behind_a_long_forward()
    out = stager.to_host(events.get(0), lambda: [kv[:8].clone(), torch.tensor([1], dtype=torch.uint8)])
    assert out[0].device.type == "cpu" and out[0].is_pinned()
    torch.testing.assert_close(out[0], big[:8].cpu(), rtol=0, atol=0)  # read after the write, not before


@pytest.mark.gpu
def test_on_cuda_a_tensor_lane_gets_the_parts_on_the_device_after_the_layer() -> None:
    events, stager, kv, big = _layer_behind_a_long_forward()
    out = stager.on_device(events.get(0), lambda: [kv[:8].clone()])
    assert out[0].device == kv.device  # complete: the side stream was synchronised before returning
    torch.testing.assert_close(out[0].cpu(), big[:8].cpu(), rtol=0, atol=0)
