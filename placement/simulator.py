"""Discrete-event simulator of one deployment serving one trace at one rate: `simulate()`.

The two modes are separate simulations on a shared core (sim_core.py: the event loop, decode
lanes advanced in closed form, a shared host): `DisaggregatedSim` (sim_disagg.py, DistServe's
model) and `ColocatedSim` (sim_coloc.py, prefill-priority or chunked prefill).
With `host_slowdown` (instances sharing one host), a step that starts while another instance is
busy runs that much slower: a prefill batch from its start, a decode lane from its next boundary
after any instance's state changes.
Deterministic: same deployment, trace and rate → same result.
"""

from __future__ import annotations

from pdserve.placement.sim_coloc import ColocatedSim
from pdserve.placement.sim_deployment import SimDeployment, SimResult
from pdserve.placement.sim_disagg import DisaggregatedSim
from pdserve.placement.workload import Trace


def simulate(dep: SimDeployment, trace: Trace, rate: float) -> SimResult:
    """Per-request TTFT and TPOT of `trace` replayed at `rate` req/s (its unit arrivals ÷ rate) on `dep`."""
    sim = ColocatedSim(dep, trace, rate) if dep.mode == "colocated" else DisaggregatedSim(dep, trace, rate)
    return sim.run()
