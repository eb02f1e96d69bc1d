"""deploy/kubernetes/distserve/: the disaggregated topology's manifests hang together and parse with our CLI."""
from __future__ import annotations

import pathlib

import yaml
from test_deploy import expand_env

from lmserve.cli import build_parser

K8S = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "distserve"


def manifests() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    return [d for name in kust["resources"] for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_distserve_topology():
    docs = manifests()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"lmserve-proxy", "lmserve-prefill", "lmserve-decode"}
    parser = build_parser()
    (proxy,) = deployments["lmserve-proxy"]["spec"]["template"]["spec"]["containers"]
    assert parser.parse_args(proxy["args"]).serving_strategy == "DistServe"
    for role in ("prefill", "decode"):
        spec = deployments[f"lmserve-{role}"]["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        (container,) = spec["template"]["spec"]["containers"]
        args = parser.parse_args(expand_env(container["args"], container))
        assert args.role == role and args.proxy_url == "http://lmserve-proxy:8000"
        assert args.server_port in {p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["metadata"]["name"] == "lmserve-proxy"
