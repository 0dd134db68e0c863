"""LockStep: one rank of a serving instance, driving its role worker in SPMD lock-step.

Every rank holds the same worker (PrefillWorker or DecodeWorker on its rank's engine) and must make
the same decisions in the same order, or the collectives inside the forward pass deadlock. Rank 0
is the instance's entry point: the actor's step thread calls `submit`/`abort` on it, which run on
rank 0 at once and are queued. Each step then does one collective (all_gather_object):

    rank 0     (queued ops, reports[0], num_free)  ─┐
    rank k     (None,       reports[k], num_free)  ─┼─> every rank: apply rank 0's ops (followers),
                                                    ┘   let each Agreement decide from all reports,
                                                        then worker.step()

Rank-local events that would make ranks diverge (a KV pull finishing, a sender lease expiring)
never act directly: an `Agreement` reports them and acts only on the decision all ranks share.
At world size 1 the same code runs with no collective (`all_gather` returns this rank's own
value): each Agreement decides from its one report, so a single-rank instance is built and
stepped exactly like a tp × pp one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch.distributed as dist

from pdserve.engine.pipeline import RankLayout
from pdserve.kvtransfer.at_exit import close_at_exit, forget
from pdserve.runtime.step_loop import StepLoop

T = TypeVar("T")
log = logging.getLogger(__name__)


def all_gather(mine: T, ranks: RankLayout) -> list[T]:
    """Every rank's `mine`, indexed by rank (a collective at world size > 1; no process group at 1)."""
    if ranks.world_size == 1:
        return [mine]
    everyone: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


class Agreement(Protocol):
    """A rank-local source of events whose effect all ranks must apply identically."""

    def local_report(self) -> Any:
        """What this rank saw since the last step (picklable, small). Called once per step, before agree()."""
        ...

    def agree(self, reports: list[Any]) -> None:
        """Act on every rank's report (index = rank). Must be a pure function of `reports` and state
        that is itself identical across ranks; runs after this step's ops were applied."""
        ...


@dataclass(frozen=True)
class Submit:
    args: tuple[Any, ...]  # the worker's submit arguments: (req,) or (req, handle)

    def apply(self, worker: Any) -> Any:
        return worker.submit(*self.args)


@dataclass(frozen=True)
class Abort:
    request_id: str

    def apply(self, worker: Any) -> Any:
        return worker.abort(self.request_id)


@dataclass(frozen=True)
class FirstToken:
    request_id: str
    token_ids: tuple[int, ...]

    def apply(self, worker: Any) -> Any:
        return worker.first_token(self.request_id, self.token_ids)  # decode: a streamed handoff's first token


class LockStep:
    """Presents the worker's interface (submit/abort/step/has_work/stats) for rank 0's step thread;
    followers call `run_follower()` instead and never see a router call."""

    def __init__(self, worker: Any, agreements: list[Agreement], ranks: RankLayout) -> None:
        self.worker, self.agreements, self.ranks = worker, agreements, ranks
        self._ops: list[Submit | Abort | FirstToken] = []
        self.stopped = False
        # Free blocks as the last step left them: rank 0 applies ops (an abort frees blocks) before
        # the collective and followers after it, so only this value is comparable across ranks.
        self._free_after_step = worker.engine.allocator.num_free
        # At exit, after the step loop (registered later, so stopped first): tell the other ranks.
        self._exit_token = close_at_exit(self, LockStep.leave)

    def submit(self, *args: Any) -> Any:
        return self._record(Submit(args))

    def abort(self, request_id: str) -> Any:
        return self._record(Abort(request_id))

    def first_token(self, request_id: str, token_ids: tuple[int, ...]) -> Any:
        return self._record(FirstToken(request_id, token_ids))

    def _record(self, op: Submit | Abort | FirstToken) -> Any:
        assert self.ranks.rank == 0, "only rank 0 takes router calls"
        self._ops.append(op)  # even if it raises: followers replay it and reach the same state
        return op.apply(self.worker)

    def has_work(self) -> bool:
        return self.worker.has_work()

    @property
    def idle(self) -> bool:
        return self.worker.idle

    def stats(self) -> Any:
        return self.worker.stats()

    def step_log(self, since: int = 0) -> Any:
        return self.worker.step_log(since)

    def step(self) -> list[Any]:
        self._sync(stop=False)
        if self.stopped:
            if self.ranks.rank == 0:  # a follower left: the instance cannot step; crash-only (the actor exits)
                raise RuntimeError("a rank of this instance left it")
            return []
        outputs = self.worker.step()
        self._free_after_step = self.worker.engine.allocator.num_free
        return outputs

    def stop(self) -> None:
        """Rank 0: end the followers' loops (they return from run_follower)."""
        self._sync(stop=True)

    def leave(self) -> None:
        """Any rank, at exit once its step loop has stopped: one last collective that stops every
        rank's loop, so no rank is left blocked in the next one (a follower waiting for rank 0's
        step would hold its process in gloo through interpreter exit), then destroys the process
        group. Bounded: a rank already gone makes the collective fail at once, and nothing more is
        sent once the ranks agreed to stop."""
        forget(self._exit_token)
        if not self.stopped:
            try:
                self._sync(stop=True)
            except RuntimeError as e:  # a peer exited first: nobody is left to tell
                log.debug("lock-step leave: %s", e)
            self.stopped = True
        if self.ranks.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()  # its gloo threads end here, not in the interpreter's teardown

    def run_follower(self) -> None:
        assert self.ranks.rank != 0, "rank 0 is driven by its actor's step thread"
        while not self.stopped:
            self.step()

    def _sync(self, stop: bool) -> None:
        """The step's one collective: share rank 0's ops and every rank's reports, then apply them."""
        mine = (self._ops if self.ranks.rank == 0 else None,
                [a.local_report() for a in self.agreements], self._free_after_step, stop)
        everyone = all_gather(mine, self.ranks)
        ops, self.stopped = everyone[0][0], any(g[3] for g in everyone)  # any rank may end the instance
        self._ops = []
        free = {g[2] for g in everyone}
        assert len(free) == 1, f"ranks diverged: free KV blocks per rank {[g[2] for g in everyone]}"
        if self.ranks.rank != 0:
            for op in ops:
                try:
                    op.apply(self.worker)
                except ValueError as e:  # rank 0 raised the same and told its caller
                    log.debug("replayed op failed as on rank 0: %s", e)
        for i, a in enumerate(self.agreements):
            a.agree([g[1][i] for g in everyone])


def make_step_loop(worker: LockStep, deliver: Callable[[list[Any]], None]) -> StepLoop:
    """The actor's step thread: rank 0 (or the only rank) steps when it has work (idle steps every
    poll interval); a follower steps whenever rank 0 does (the collective paces it) until stopped."""
    if worker.ranks.rank != 0:
        return StepLoop(worker.step, lambda: True, deliver, stopped=lambda: worker.stopped, on_death=_exit_process)
    # Sleep on the inbox (idle poll) when the last step ran no batch: waiting for a pull or for
    # memory must not spin a core that the other engine on this box needs.
    return StepLoop(worker.step, lambda: worker.has_work() and not worker.idle, deliver, on_death=_exit_process)


def _exit_process() -> None:
    """Crash-only: an actor whose step loop died exits, Ray restarts it, the router fails over."""
    logging.getLogger(__name__).error("step loop died; exiting so Ray restarts this actor")
    os._exit(1)
