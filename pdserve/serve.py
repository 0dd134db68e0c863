"""`pdserve serve`: start the pools and the OpenAI-compatible router, print the URL, run until Ctrl-C.
A router that dies is replaced and serves again on the same port, which answers 503 with
Retry-After meanwhile (placement/restarting.py); one that cannot (it has not served for a minute)
stops `pdserve serve` with exit status 1 and the reason.

`--address local` starts an embedded Ray on this machine (the laptop default); `--address auto`
joins the cluster `ray up cluster.yaml` started.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from pdserve.config import ServingConfig


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model with disaggregated (or colocated) pools")
    p.add_argument("--config", metavar="FILE",
                   help="serving config YAML (pdserve plan writes one; default: the laptop config in the README)")
    p.add_argument("--model", help="override the config's model: a catalog name or a Hugging Face directory")
    p.add_argument("--mode", choices=["disaggregated", "colocated"], help="override the config's mode")
    p.add_argument("--address", default="local",
                   help="'local' (an embedded Ray on this machine), 'auto' (the cluster `ray up` started) "
                        "or HOST:PORT of a cluster")
    p.add_argument("--host", help="bind address (default: the config's router.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port, 0 for any free one (default: the config's router.port, 8000)")
    p.add_argument("--placement-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for nodes that can hold the pools before failing with what is "
                        "missing (default 30; give an autoscaling cluster minutes)")
    p.set_defaults(func=run)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that shutdown runs as it does for Ctrl-C."""

    signum = signal.SIGTERM


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
    # ray.init installs its own SIGTERM handler (sys.exit mid-call); ours unwinds like Ctrl-C, so
    # the deployment and Ray shut down in order and nothing dumps a stack on the terminal.
    fired: list[int] = []

    def terminate(signum: int, frame: object) -> None:
        fired.append(signum)
        raise Terminated()

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        if fired:  # Ray's calls may turn our exception into a plain KeyboardInterrupt
            raise Terminated() from None
        raise
    finally:
        ray.shutdown()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def check_port_free(host: str, port: int) -> None:
    """Fail before starting anything when the router could not bind (port 0 is always free)."""
    if port == 0:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"router.port: cannot listen on {host}:{port} ({e.strerror}); "
                             "pass --port with a free port, or --port 0 for any") from None


def run(args: argparse.Namespace) -> int:
    from pdserve.placement.feasibility import LaunchError
    from pdserve.placement.launch import launch

    cfg = load_config(args)
    if args.address == "local":
        check_port_free(cfg.router.host, cfg.router.port)
    with ray_session(args.address, cfg):
        print(f"pdserve: starting {cfg.mode} serving of {cfg.model} ...", flush=True)
        try:
            deployment = launch(cfg, place_timeout_s=args.placement_timeout)
        except LaunchError as e:
            print(f"pdserve: error: {e}", file=sys.stderr, flush=True)
            return 1
        print(f"pdserve: ready at {deployment.url}  (OpenAI API: {deployment.url}/v1; Ctrl-C stops)", flush=True)
        failure: str | None = None
        try:
            failure = deployment.supervise(threading.Event(), poll_s=0.5)  # replaces a router that died; None once stopped
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Terminated)
            pass
        if failure is not None:
            print(f"pdserve: error: {failure}; shutting down", file=sys.stderr, flush=True)
        else:
            print("pdserve: shutting down", flush=True)
        deployment.shutdown()
    return 0 if failure is None else 1
