"""lorastack on Ray Serve: `lorastack serve --backend ray`, or `serve run` with the app builder.

    lorastack serve --backend ray --replicas 2 --gateways 2 --store ~/my-store
    serve run lorastack.serve.ray_app:build_app replicas=2 gateways=2 store=/path/to/store

Two Serve deployments:
- `VllmReplica` (`--replicas`, or an autoscaling_config in a Serve config file): each replica
  runs one vLLM OpenAI server with multi-LoRA, exactly as the gateway starts its own, and
  registers its URL in `<work dir>/upstreams/` (renewed every 5 s, removed when it stops). Its
  `check_health` fails when vLLM has died, so Serve replaces the replica.
- `GatewayIngress` (`--gateways`): lorastack's gateway as Serve's HTTP ingress, following the
  registered replicas (`upstream_dir`) with its own routes (classify, auth, limits, metrics),
  adapter-affinity routing, and leases so that several gateways agree on what is loaded.

Why not Ray's LLM API (ray.serve.llm): here its ingress knows only `base:adapter` names, takes
LoRA adapters only from s3/gs/azure, and does not pass /v1/classify on (deploy/ray/probe.py).
Both deployments share the work dir, which vLLM reads snapshots from: one node, or a volume
mounted at the same path on every node, with `--vllm-host 0.0.0.0` so that gateways on other
nodes reach each replica at its node's address (on a private cluster network only).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lorastack.serve.leases import RENEW_S, register
from lorastack.serve.settings import ServeSettings


def _serve():
    try:
        from ray import serve
    except ImportError as exc:
        raise SystemExit("lorastack serve --backend ray needs Ray Serve: pip install "
                         "'lorastack[ray]' (ray[serve] 2.60)") from exc
    return serve


class VllmReplica:
    """One vLLM server as a Serve replica (wrapped by serve.deployment in build_app)."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        # (Serve awaits an async constructor: the replica is ready once vLLM is healthy)
        from lorastack.adapters.models import resolve_base
        from lorastack.serve.settings import fit_context
        from lorastack.serve.vllm_proc import WILDCARD_HOSTS, VllmProcess

        s = ServeSettings(**settings)
        base = resolve_base(s.base)
        s, _ = fit_context(s, base.path)
        work = Path(s.work_dir or ".")
        key = _serve().get_replica_context().replica_id.unique_id
        self.proc = VllmProcess(s, base.path, base.name, work / "vllm" / f"{key}.log")
        self.proc.die_with_parent = True  # Ray may kill the replica (memory) without __del__
        self.proc.start()
        await self.proc.wait_healthy(s.start_timeout_s, print)
        url = self.proc.url
        if s.vllm_host in WILDCARD_HOSTS:  # every address: gateways on other nodes use this one
            import ray

            url = f"http://{ray.util.get_node_ip_address()}:{self.proc.port}"
        self.path = register(work / "upstreams", key, url)
        self._stop = threading.Event()
        threading.Thread(target=self._renew, daemon=True).start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            if self.proc.exit_code() is None:
                self.path.touch()

    def check_health(self) -> None:
        code = self.proc.exit_code()
        if code is not None:
            raise RuntimeError(f"vLLM exited with code {code}:\n{self.proc.describe_log(15)}")

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.path.unlink(missing_ok=True)  # gateways stop routing here at once
        if getattr(self, "proc", None) is not None:
            self.proc.stop()


class GatewayIngress:
    """lorastack's gateway app as Serve's ingress (its ASGI app built in the replica)."""

    def __init__(self, settings: dict[str, Any], replicas: Any = None) -> None:
        self.settings = ServeSettings(**settings)
        self.replicas = replicas  # the VllmReplica deployment: bound so the app starts it

    def __serve_build_asgi_app__(self):
        from lorastack.serve.app import create_app

        return create_app(self.settings)


def build_app(args: dict[str, Any] | ServeSettings):
    """The Serve application: `args` are ServeSettings fields (strings from `serve run` too)."""
    serve = _serve()
    s = args if isinstance(args, ServeSettings) else ServeSettings(**args)
    work = Path(s.work_dir or tempfile.mkdtemp(prefix="lorastack-ray-")).resolve()
    shared = s.model_copy(update={"work_dir": work, "upstream": [], "backend": "local",
                                  "upstream_dir": work / "upstreams"})
    vllm = serve.deployment(VllmReplica, name="VllmReplica", num_replicas=s.replicas,
                            ray_actor_options={"num_cpus": 1}, health_check_period_s=5,
                            graceful_shutdown_timeout_s=30)
    fields = shared.model_dump(mode="json")
    gateway = serve.deployment(serve.ingress()(GatewayIngress), name="GatewayIngress",
                               num_replicas=s.gateways, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1000)
    # the gateway finds the replicas through the work dir, where each registers once healthy
    return gateway.bind(fields, vllm.bind({**fields, "upstream_dir": None}))


def run(settings: ServeSettings) -> None:
    """`lorastack serve --backend ray`: start (or join) Ray, run the app until Ctrl-C."""
    serve = _serve()
    import ray

    from lorastack.serve.gateway import say

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # a local cluster: the vLLM replicas take one logical CPU each, the gateways none
        ray.init(num_cpus=max(os.cpu_count() or 1, settings.replicas + 1))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    started = time.monotonic()
    own_work = settings.work_dir is None
    work = Path(settings.work_dir or tempfile.mkdtemp(prefix="lorastack-ray-"))
    settings = settings.model_copy(update={"work_dir": work})
    serve.run(build_app(settings), name="lorastack", route_prefix="/", blocking=False)
    say(f"Ray Serve app 'lorastack' running on http://{settings.host}:{settings.port} after "
        f"{time.monotonic() - started:.0f} s ({settings.replicas} vLLM replica(s), "
        f"{settings.gateways} gateway(s)); Ctrl-C stops it")

    def stop(*_):  # SIGTERM (docker stop, Kubernetes) stops the app as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        say("SIGINT is ignored in this process (started in the background); stop it with "
            "SIGTERM")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
