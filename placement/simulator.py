"""Discrete-event simulator of one deployment serving one trace at one rate: `simulate()`.

The two modes are separate simulations on a shared core (sim_core.py: the event loop, decode
lanes advanced in closed form, a shared host): `DisaggregatedSim` (sim_disagg.py, DistServe's
model) and `ColocatedSim` (sim_coloc.py, prefill-priority or chunked prefill).
With `host_slowdown` (instances sharing one host), a step that starts while another instance is
busy runs that much slower: a prefill batch from its start, a decode lane from its next boundary
after any instance's state changes.
Multi-turn sessions and prefix reuse: sim_reuse.py and sim_cond.py.
Deterministic: same deployment, trace and rate → same result.
"""

from __future__ import annotations

from pdserve.placement.sessions import SessionTrace
from pdserve.placement.sim_coloc import ColocatedSim
from pdserve.placement.sim_core import Simulation
from pdserve.placement.sim_deployment import SimDeployment, SimResult
from pdserve.placement.sim_disagg import DisaggregatedSim
from pdserve.placement.workload import Trace


def simulate(dep: SimDeployment, trace: Trace, rate: float) -> SimResult:
    """Per-request TTFT and TPOT of `trace` replayed at `rate` req/s (its unit arrivals ÷ rate) on `dep`.
    Sessions (a `SessionTrace`) or reuse switched on in `dep`: the reuse simulations (sim_reuse.py)."""
    return simulation(dep, trace, rate).run()


def simulation(dep: SimDeployment, trace: Trace, rate: float) -> Simulation:
    """The simulation `simulate` runs (its counters readable after `run()`)."""
    if dep.models_reuse or isinstance(trace, SessionTrace):
        if dep.phases != "both":
            raise ValueError("simulate: sessions and prefix reuse are simulated with both phases")
        from pdserve.placement.sim_cond import ReuseDisaggregatedSim
        from pdserve.placement.sim_reuse import ReuseColocatedSim

        return (ReuseColocatedSim if dep.mode == "colocated" else ReuseDisaggregatedSim)(dep, trace, rate)
    return ColocatedSim(dep, trace, rate) if dep.mode == "colocated" else DisaggregatedSim(dep, trace, rate)
