"""pdserve.runtime: what every role actor runs, whatever the role and the (tp, pp) layout.

  step_loop.py   StepLoop: the thread that owns a worker and steps it; callers submit closures
  lockstep.py    LockStep: the ranks of one instance stepping together (a pass-through at world size 1)
  shell.py       WorkerShell: the actor lifecycle both roles share (lazy start, rendezvous, stats, health)

May import: pdserve.engine, pdserve.kvtransfer and the contracts (config, types). Never a role
(prefill, decode), the router or placement; never ray (the actors in prefill/ and decode/ are the
Ray shells around WorkerShell).
"""
