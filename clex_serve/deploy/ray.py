"""The Ray Serve application: ``serve run clex_serve.deploy.ray:build_app num_replicas=2`` (Ray's builder
convention; every other argument is a ``clex-serve serve`` flag without its dashes, ``model=...``,
``max_num_seqs=32``, ``enable_prefix_caching=false``), or a ``serve deploy`` config naming the same builder
(``deploy/serve_config.yaml``).

Two deployments: ``OpenAIIngress`` (behind Ray's HTTP proxy; forwards) and ``EngineReplica`` (one engine
each: one GPU where the cluster has them, CPU threads otherwise), routed by ``ClexScaleAwareRouter``.

Backpressure agrees with the single server: a replica takes at most ``max_num_seqs`` running plus
``max_queued_requests`` waiting requests (Ray's ``max_ongoing_requests``); beyond that requests wait in
Ray's queue, and past ``max_queued_requests`` there too, the ingress answers the single server's 429 with
``Retry-After``. Without ``--max-queued-requests`` nothing is refused (each replica then takes up to twice
``max_num_seqs``, and Ray's queue is unbounded), as the single server refuses nothing.
"""

from __future__ import annotations

import argparse
import os

from ray import serve
from ray.serve.config import RequestRouterConfig

from clex_serve.deploy.ingress import OpenAIIngress
from clex_serve.deploy.replica import EngineReplica, parse_serve_flags
from clex_serve.deploy.router import ClexScaleAwareRouter

# Arguments of the application itself; every other one is a clex-serve flag for the replicas.
APP_ARGS = {
    "num_replicas": "engine replicas (default 1)",
    "router": "clex (default: prefix affinity at the prompt's CLEX scale), text (prefix affinity on tokens "
    "alone, for comparison) or ray (Ray's default, power of two choices)",
    "num_cpus_per_replica": "Ray CPUs per replica (default 1; also the engine's --threads on the CPU)",
    "num_gpus_per_replica": "Ray GPUs per replica (default 1 where the cluster, or for serve run this machine, "
    "has GPUs, else 0)",
    "routing_stats_period_s": "how often replicas report their load and cache (default 1)",
}
# By import path: Ray imports the class in the ingress's process, where the ingress finds its instances.
_ROUTER_PATH = f"{ClexScaleAwareRouter.__module__}.{ClexScaleAwareRouter.__name__}"
ROUTERS = {
    "clex": (_ROUTER_PATH, {}),
    "text": (_ROUTER_PATH, {"key_on_scale": False}),
    "ray": ("clex_serve.deploy.ray_default_router.RayDefaultRouter", {}),
}


def _flags(args: dict) -> list[str]:
    """``{"max_num_seqs": "32", "enable_prefix_caching": "false"}`` -> ``["--max-num-seqs", "32"]``."""
    flags = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        text = str(value)
        if text.lower() in ("true", "false"):
            on = text.lower() == "true"
            if key == "log_scale":
                flags.append(flag if on else "--no-log-scale")
            elif on:
                flags.append(flag)
        else:
            flags += [flag, text]
    return flags


def _cluster_has_gpus() -> bool:
    """The cluster's resources where Ray is up (``serve deploy`` builds on the cluster); else this machine's
    (``serve run`` builds the application before it connects)."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def build_app(args: dict) -> serve.Application:
    args = dict(args or {})
    app_args = {key: args.pop(key) for key in list(args) if key in APP_ARGS}
    num_replicas = int(app_args.get("num_replicas", 1))
    router = str(app_args.get("router", "clex"))
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    args.setdefault("enable_prefix_caching", "true")  # what the router routes on
    num_cpus = float(app_args.get("num_cpus_per_replica", 1))
    gpus = app_args.get("num_gpus_per_replica")
    if gpus is not None:
        num_gpus = float(gpus)
    else:
        num_gpus = 0.0 if str(args.get("device", "auto")) == "cpu" else (1.0 if _cluster_has_gpus() else 0.0)
    if not num_gpus and "threads" not in args:
        args["threads"] = str(max(1, int(num_cpus)))
    flags = _flags(args)
    if "api_key" not in args and os.environ.get("CLEX_SERVE_API_KEY"):
        flags += ["--api-key", os.environ["CLEX_SERVE_API_KEY"]]  # the driver's environment, not the workers'
    try:
        parsed = parse_serve_flags(flags)  # a bad flag fails here, on the driver, not in every replica
    except SystemExit:
        raise ValueError(f"invalid clex-serve flags {' '.join(flags)} (the message above says which)") from None
    return _application(parsed, flags, num_replicas, router, num_cpus, num_gpus, app_args)


def _application(
    parsed: argparse.Namespace, flags: list[str], num_replicas: int, router: str, num_cpus, num_gpus, app_args
) -> serve.Application:
    queued = parsed.max_queued_requests
    router_class, router_kwargs = ROUTERS[router]
    router_config = {
        "request_routing_stats_period_s": float(app_args.get("routing_stats_period_s", 1.0)),
        "request_router_class": router_class,
        "request_router_kwargs": router_kwargs,
    }
    engine = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=parsed.max_num_seqs + (queued if queued is not None else parsed.max_num_seqs),
        max_queued_requests=queued if queued is not None else -1,
        request_router_config=RequestRouterConfig(**router_config),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=parsed.graceful_timeout,
    ).bind(flags)
    ingress = serve.deployment(
        OpenAIIngress,
        name="OpenAIIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000,  # it only forwards: the replicas' limits are the ones that bind
        graceful_shutdown_timeout_s=parsed.graceful_timeout,
    )
    return ingress.bind(engine, parsed.api_key, parsed.max_request_body_bytes)
