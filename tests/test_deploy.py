"""deploy/: the Dockerfile and the Kubernetes manifests cannot run here, so parse them and check that they hang
together: selectors match labels, probes hit /health on a declared port, services point at declared ports, the
api_servers' --proxy-url names the proxy Service, and every command line parses with our own CLI."""
from __future__ import annotations

import json
import pathlib
import re
import shlex
from urllib.parse import urlsplit

import pytest
import yaml

from lmserve.cli import build_parser

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"


def load_manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in load_manifests() if d["kind"] == kind]


def expand_env(args: list[str], container: dict) -> list[str]:
    """Kubernetes' $(VAR) expansion, with a made-up value for every env var the container declares."""
    env = {e["name"]: "10.0.0.7" for e in container.get("env", [])}
    out = []
    for a in args:
        for var in re.findall(r"\$\((\w+)\)", a):
            assert var in env, f"{container['name']}: $({var}) is not declared in env"
            a = a.replace(f"$({var})", env[var])
        out.append(a)
    return out


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_manifests_are_well_formed():
    docs = load_manifests()
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {
        ("Deployment", "lmserve-api-server"), ("Service", "lmserve-api-server"),
        ("Deployment", "lmserve-proxy"), ("Service", "lmserve-proxy")}
    for d in docs:
        assert d["apiVersion"] == {"Deployment": "apps/v1", "Service": "v1"}[d["kind"]]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])


@pytest.mark.parametrize("deployment", by_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_deployment(deployment):
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports, probe
    args = expand_env(container["args"], container)
    parsed = build_parser().parse_args(args)           # the command line is one our CLI accepts
    assert parsed.server_port in ports.values()        # and it listens on the declared port
    volumes = {v["name"] for v in spec["template"]["spec"].get("volumes", [])}
    assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes


def test_proxy_deployment_persists_its_node_list():
    (proxy,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lmserve-proxy"]
    (container,) = proxy["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.node_file and any(args.node_file.startswith(m["mountPath"]) for m in container["volumeMounts"])
    assert args.strategy == "prefix_aware"


@pytest.mark.parametrize("service", by_kind("Service"), ids=lambda s: s["metadata"]["name"])
def test_service_targets_a_deployment_port(service):
    matching = [d for d in by_kind("Deployment")
                if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(matching) == 1, "a Service selects exactly one Deployment"
    (container,) = matching[0]["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    numbers = {p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in names | numbers


def test_api_servers_register_with_the_proxy_service():
    (api,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lmserve-api-server"]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(expand_env(container["args"], container))
    proxy_url = urlsplit(args.proxy_url)
    (proxy_svc,) = [s for s in by_kind("Service") if s["metadata"]["name"] == proxy_url.hostname]
    assert proxy_url.port in {p["port"] for p in proxy_svc["spec"]["ports"]}
    assert args.server_name == "10.0.0.7"   # registers under its pod IP, reachable from the proxy pod


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile():
    instructions = dockerfile_instructions()
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD",
             "LABEL"}
    assert all(i in known for i, _ in instructions), [i for i, _ in instructions if i not in known]
    assert instructions[0][0] in ("FROM", "ARG") and any(i == "FROM" for i, _ in instructions)
    root = DEPLOY.parent
    copied = {src.rstrip("/") for instr, rest in instructions if instr == "COPY" for src in shlex.split(rest)[:-1]}
    import tomllib
    backend_path = tomllib.loads((root / "pyproject.toml").read_text())["build-system"].get("backend-path", [])
    assert set(backend_path) <= copied, "pip install . needs the build backend in the image"
    for instr, rest in instructions:
        if instr == "COPY":
            *sources, _dest = shlex.split(rest)
            for src in sources:
                if src == "README.md":      # the README is the lead's; pyproject.toml needs it to build
                    continue
                assert (root / src).exists(), f"COPY {src}: not in the repository"
    # every lmserve command the image build runs exists (the kernels are built into the image, as its user)
    runs = [shlex.split(rest) for instr, rest in instructions if instr == "RUN" and rest.startswith("lmserve ")]
    assert ["lmserve", "build-kernels"] in runs
    for argv in runs:
        build_parser().parse_args(argv[1:])
    users = [i for i, (instr, _) in enumerate(instructions) if instr == "USER"]
    assert users and users[0] < next(i for i, (instr, rest) in enumerate(instructions)
                                     if instr == "RUN" and rest.startswith("lmserve build-kernels"))
    d = dict(instructions)
    assert json.loads(d["ENTRYPOINT"]) == ["lmserve"]
    assert build_parser().parse_args(json.loads(d["CMD"])).server == "api_server"
    assert {"23333", "8000"} <= set(d["EXPOSE"].split())
    assert "/health" in d["HEALTHCHECK"]
    # the build context is cut down to what the image needs (BuildKit reads Dockerfile.dockerignore)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and "!lmserve/" in ignore and "!pyproject.toml" in ignore
    assert all(f"!{p}/" in ignore for p in backend_path)
