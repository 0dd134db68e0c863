"""Host staging for the byte transports on a CUDA pool: a transfer must not queue behind the forward.

The step thread runs each forward on its current stream. If a transport's thread gathered and
copied KV on that same stream, each layer's copy would wait for every kernel already enqueued
(under load, a transfer takes about layers × step time). Instead:

    step thread     layer_hook(l): record layer l's event on the compute stream (its KV is enqueued)
    transfer thread side stream waits for that event only, gathers + encodes there, copies each
                    part into pinned host memory (non_blocking), then waits for the side stream

so the copy overlaps the next layers' compute. With a tensor lane (`on_device`) the parts stay on the
GPU and only the gather + encode runs on the side stream. Off CUDA both are no-ops.
"""

from __future__ import annotations

from typing import Callable

import torch


class LayerEvents:
    """One CUDA event per local layer, recorded by the step thread once the layer's KV is enqueued."""

    def __init__(self, device: torch.device, num_layers: int) -> None:
        cuda = torch.device(device).type == "cuda"
        self.events = [torch.cuda.Event() for _ in range(num_layers)] if cuda else []

    def record(self, local_layer: int) -> None:
        if self.events:
            self.events[local_layer].record()  # on the calling (step) thread's current stream

    def get(self, local_layer: int) -> torch.cuda.Event | None:
        return self.events[local_layer] if self.events else None


class HostStager:
    """Runs `produce` (gather + encode) on a side stream after `event`; returns its parts in pinned
    host memory, complete. Off CUDA: `produce()` as it is."""

    def __init__(self, device: torch.device) -> None:
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_host(self, event: torch.cuda.Event | None, produce: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        return self._run(event, produce, to_host=True)

    def on_device(self, event: torch.cuda.Event | None, produce: Callable[[], list[torch.Tensor]]
                  ) -> list[torch.Tensor]:
        """`produce()` on the side stream after `event`, its parts left where they are (a tensor lane
        sends them from the device) and complete when this returns. Off CUDA: `produce()`."""
        return self._run(event, produce, to_host=False)

    def _run(self, event: torch.cuda.Event | None, produce: Callable[[], list[torch.Tensor]],
             to_host: bool) -> list[torch.Tensor]:
        if self.stream is None:
            return produce()
        with torch.cuda.stream(self.stream):
            if event is not None:
                self.stream.wait_event(event)
            parts = produce()
            if to_host:
                parts = [_pinned_copy(p) if p.device.type == "cuda" else p for p in parts]
        self.stream.synchronize()  # the parts are complete (on the host if asked), and the pool was read
        return parts


def _pinned_copy(p: torch.Tensor) -> torch.Tensor:
    pinned = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
    pinned.copy_(p, non_blocking=True)
    return pinned
