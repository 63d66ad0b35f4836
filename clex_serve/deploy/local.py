"""``clex-serve --ray-replicas N``: the Ray Serve application on a Ray cluster of this machine alone, its HTTP
proxy on ``--host``/``--port``, until SIGTERM or Ctrl-C (then Serve and Ray stop, and the command exits 0).

The machine is shared out: each replica gets one GPU where there are at least N (fewer is refused), else
an equal share of the CPUs (and of ``--kv-cache-memory-fraction``, unless ``--kv-cache-memory`` says how much).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading

# Flags of the single server that the Ray proxy, not a replica, stands for: (flag, takes a value).
_PROXY_FLAGS = {"--ray-replicas": True, "--host": True, "--port": True, "--uvicorn-log-level": True}


def replica_flags(flags: list[str]) -> list[str]:
    """The command's flags without those that belong to the proxy."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
            continue
        name = flag.split("=", 1)[0]
        if name in _PROXY_FLAGS:
            skip = _PROXY_FLAGS[name] and "=" not in flag
            continue
        kept.append(flag)
    return kept


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port}: {error.strerror}") from None


def serve_on_local_ray(args: argparse.Namespace, flags: list[str]) -> int:
    if args.ui:
        raise ValueError("--ui is not served with --ray-replicas; run `clex-serve web --url http://HOST:PORT/v1`")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--ray-replicas needs Ray Serve: pip install 'clex-serve[ray]'") from None
    import torch

    from clex_serve.cli.main import DEMO_MODEL_NAME
    from clex_serve.deploy.ray import build_app

    replicas = args.ray_replicas
    if args.port:
        _check_port_free(args.host, args.port)  # before any model loads
    kept = replica_flags(flags)
    app_args = {"num_replicas": replicas}
    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    cpus = os.cpu_count() or 1
    if gpus:
        if gpus < replicas:
            raise ValueError(f"--ray-replicas {replicas} needs {replicas} GPUs, one a replica; this machine has {gpus}")
        app_args["num_gpus_per_replica"] = 1
        app_args["num_cpus_per_replica"] = max(1, cpus // replicas)
    else:
        app_args["num_gpus_per_replica"] = 0
        app_args["num_cpus_per_replica"] = cpus / replicas
        if args.threads is None:
            kept += ["--threads", str(max(1, cpus // replicas))]
        if args.kv_cache_memory is None:
            kept += ["--kv-cache-memory-fraction", str(args.kv_cache_memory_fraction / replicas)]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    ray.init(
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=False,
        **({"_node_ip_address": "127.0.0.1"} if loopback else {}),
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app({**_as_app_args(kept), **app_args})
        serve.run(app, name="clex-serve", route_prefix="/")
        name = args.served_model_name or args.model or DEMO_MODEL_NAME
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"clex-serve: serving {name} at http://{shown}:{args.port}/v1 on Ray Serve, {replicas} replicas", flush=True
        )
        stop.wait()
    finally:
        # Bounded: where the signal reached Ray's own processes too (Ctrl-C goes to the whole process group),
        # Serve cannot answer any more and its shutdown would wait for ever.
        stopper = threading.Thread(target=serve.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout=args.graceful_timeout + 10)
        ray.shutdown()
    return 0


def _as_app_args(flags: list[str]) -> dict:
    """Flags back into the builder's arguments (``--max-num-seqs 8`` -> ``{"max_num_seqs": "8"}``)."""
    app_args, index = {}, 0
    while index < len(flags):
        flag = flags[index]
        name, _, value = flag[2:].partition("=")
        key = name.replace("-", "_")
        if value or "=" in flag:
            app_args[key] = value
        elif index + 1 < len(flags) and not flags[index + 1].startswith("--"):
            app_args[key] = flags[index + 1]
            index += 1
        elif key == "no_log_scale":  # the one --x / --no-x flag
            app_args["log_scale"] = "false"
        else:
            app_args[key] = "true"
        index += 1
    return app_args
