"""pdserve.placement: the planner. Latency models (profiled, published or roofline), the
discrete-event simulator (sim_core + sim_disagg / sim_coloc), the placement search and `Plan`,
the simulator-fidelity calibration (calibrate, host_speed, steps, fidelity), and `launch`.

May import: its own modules, `pdserve.config` / `pdserve.types` / `pdserve.models` (contracts),
`pdserve.router.policies` (the dispatch rules the simulator replays) and bench's file readers
(lengths, arrivals, workloads, results). No torch (except `profile.measure_engine`, imported
lazily) and no ray (except launch.py, where the actors are created).
"""
