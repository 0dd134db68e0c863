"""`pdserve serve`: start the pools and the OpenAI-compatible router, print the URL, run until Ctrl-C.
A router that dies is restarted and serves again on the same port; one that cannot (it has not
served for a minute) stops `pdserve serve` with exit status 1 and the reason.

`--address local` starts an embedded Ray on this machine (the laptop default); `--address auto`
joins the cluster `ray up cluster.yaml` started.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from pdserve.config import ServingConfig


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model with disaggregated (or colocated) pools")
    p.add_argument("--config", help="serving config YAML (pdserve plan writes one); defaults run on a laptop")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--mode", choices=["disaggregated", "colocated"], help="override the config's mode")
    p.add_argument("--address", default="local", help="'local' (embedded Ray) or 'auto' / host:port of a cluster")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace) -> ServingConfig:
    cfg = ServingConfig.load(args.config) if args.config else ServingConfig()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    changes: dict[str, object] = {"router": dataclasses.replace(cfg.router, **overrides)}
    if getattr(args, "model", None):
        changes["model"] = args.model
    if getattr(args, "mode", None):
        changes["mode"] = args.mode
    return cfg.replace(**changes)


def actors_needed_cpus(cfg: ServingConfig) -> float:
    pools = [cfg.decode] + ([cfg.prefill] if cfg.mode == "disaggregated" else [])
    return sum(p.instances * p.tp * p.pp * p.num_cpus for p in pools)


@contextmanager
def ray_session(address: str, cfg: ServingConfig) -> Iterator[None]:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address == "local":
        from pdserve.models import resolve_model

        resolve_model(cfg.model)  # convert once here, not racing in every worker
        cpus = max(os.cpu_count() or 1, actors_needed_cpus(cfg))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> int:
    from pdserve.placement.launch import launch

    cfg = load_config(args)
    with ray_session(args.address, cfg):
        print(f"pdserve: starting {cfg.mode} serving of {cfg.model} ...", flush=True)
        deployment = launch(cfg)
        print(f"pdserve: ready at {deployment.url}  (OpenAI API: {deployment.url}/v1; Ctrl-C stops)", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        failure: str | None = None
        try:
            failure = deployment.supervise(stop)  # restarts a router that died; None once stopped
        except KeyboardInterrupt:
            pass
        if failure is not None:
            print(f"pdserve: error: {failure}; shutting down", file=sys.stderr, flush=True)
        else:
            print("pdserve: shutting down", flush=True)
        deployment.shutdown()
    return 0 if failure is None else 1
