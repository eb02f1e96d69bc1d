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


def test_launch_prefill_and_decode_servers(monkeypatch):
    """`serve launch --prefill-servers N --decode-servers M`: N + M servers with their roles, the proxy in
    DistServe mode."""
    import lmserve.proxy.launch as launch_mod
    seen = {}

    def fake_launch(config, num_servers, server_argv, **kwargs):
        seen.update(config=config, num_servers=num_servers, roles=kwargs.get("roles"))
        return 0

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    args = build_parser().parse_args(["serve", "launch", "m.gguf", "--prefill-servers", "1", "--decode-servers",
                                      "2"])
    assert args.func(args) == 0
    assert seen["num_servers"] == 3 and seen["roles"] == ["prefill", "decode", "decode"]
    assert seen["config"].serving_strategy == "DistServe"
    assert "--serving-strategy" in launch_mod.proxy_argv(seen["config"])
