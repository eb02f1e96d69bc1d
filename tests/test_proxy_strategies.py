"""Pure-logic tests of the proxy: routing strategies, prefix hashing, session pins, node registry + node file."""
from __future__ import annotations

import ast
import json
import pathlib
import random
from collections import Counter

import pytest

from lmserve.proxy.config import ProxyConfig
from lmserve.proxy.nodes import Node, NodeRegistry, normalize_url
from lmserve.proxy.strategies import (
    MinExpectedLatency,
    MinObservedLatency,
    PrefixAware,
    RandomStrategy,
    RouteRequest,
    SessionTable,
    make_strategy,
    prefix_block_hashes,
    prompt_text,
)


def nodes(n: int, **kw) -> list[Node]:
    return [Node(url=f"http://n{i}:1", models=["m"], is_healthy=True, **kw) for i in range(n)]


def chat(system: str, user: str, **kw) -> RouteRequest:
    return RouteRequest({"model": "m", "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": user}], **kw})


def test_normalize_url():
    assert normalize_url("127.0.0.1:23333/") == "http://127.0.0.1:23333"
    assert normalize_url(" https://h:1 ") == "https://h:1"
    with pytest.raises(ValueError):
        normalize_url("ftp://h:1")
    with pytest.raises(ValueError):
        normalize_url("http://")


def test_prompt_text_shapes():
    assert prompt_text({"prompt": "abc"}) == "abc"
    assert prompt_text({"prompt": [1, 2, 3]}) == "1,2,3"
    assert prompt_text({"prompt": ["first", "second"]}) == "first"
    assert prompt_text({"input": "emb"}) == "emb"
    assert prompt_text({"input_ids": [5, 6]}) == "5,6"
    multi = prompt_text({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert multi == "user\x1fhi\x1e"
    # a longer conversation extends the text of the shorter one: shared history = shared prefix
    a = prompt_text({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}]})
    b = prompt_text({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                                  {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]})
    assert b.startswith(a)


def test_prefix_block_hashes_are_chained():
    h1 = prefix_block_hashes("a" * 10 + "b" * 10 + "c" * 5, 10, 1000)
    h2 = prefix_block_hashes("a" * 10 + "b" * 10 + "d" * 10, 10, 1000)
    h3 = prefix_block_hashes("x" * 10 + "b" * 10, 10, 1000)
    assert len(h1) == 2 and len(h2) == 3          # only full blocks
    assert h1 == h2[:2]
    assert h3[1] != h1[1]                          # same block text after a different prefix: different hash
    assert len(prefix_block_hashes("a" * 100, 10, 35)) == 3


def test_random_is_weighted_by_speed():
    ns = nodes(2)
    ns[0].speed, ns[1].speed = 3, 1
    s = RandomStrategy(random.Random(0))
    counts = Counter(s.select(ns, RouteRequest({})).url for _ in range(4000))
    assert 0.70 < counts[ns[0].url] / 4000 < 0.80


def test_min_expected_latency():
    ns = nodes(3)
    ns[0].num_unfinished, ns[1].num_unfinished, ns[2].num_unfinished = 4, 1, 2
    s = MinExpectedLatency(random.Random(0))
    assert s.select(ns, RouteRequest({})) is ns[1]
    ns[2].speed, ns[1].speed = 10, 1   # (2+1)/10 < (1+1)/1
    assert s.select(ns, RouteRequest({})) is ns[2]
    # ties are broken at random, not always the first node
    idle = nodes(3)
    assert len({s.select(idle, RouteRequest({})).url for _ in range(100)}) == 3


def test_min_observed_latency_prefers_fast_and_unmeasured_nodes():
    ns = nodes(3)
    ns[0].latency.extend([1.0, 1.2])
    ns[1].latency.extend([0.2, 0.3])
    ns[2].latency.extend([0.5])
    s = MinObservedLatency(random.Random(0))
    assert s.select(ns, RouteRequest({})) is ns[1]
    ns[1].num_unfinished = 4           # 0.25 * 5 > 0.5 * 1: a burst does not herd onto the fastest node
    assert s.select(ns, RouteRequest({})) is ns[2]
    ns.append(Node(url="http://new:1", models=["m"], is_healthy=True))
    assert s.select(ns, RouteRequest({})).url == "http://new:1"


def test_prefix_aware_keeps_a_shared_prefix_on_one_node():
    ns = nodes(3)
    s = PrefixAware(block_chars=16, max_chars=4096, rng=random.Random(0))
    systems = [f"system prompt number {k} " * 20 for k in range(6)]
    owner = {}
    for round_ in range(5):
        for k, sys_prompt in enumerate(systems):
            req = chat(sys_prompt, f"question {round_}")
            node = s.select(ns, req)
            s.on_routed(node, req)
            owner.setdefault(k, node.url)
            assert node.url == owner[k]
    # the first requests of different prefixes went to the least-loaded nodes: all nodes got some prefixes
    assert len(set(owner.values())) == 3
    assert s.num_prefix_routed == 6 * 4


def test_prefix_aware_load_bound_spills_to_least_loaded():
    ns = nodes(2)
    s = PrefixAware(block_chars=16, balance_factor=1.5, rng=random.Random(0))
    req = chat("shared " * 50, "q")
    first = s.select(ns, req)
    s.on_routed(first, req)
    other = ns[1] if first is ns[0] else ns[0]
    first.num_unfinished = 2               # mean 1.0, bound 1.5: over
    assert s.select(ns, req) is other
    assert s.num_load_spilled == 1
    s.on_routed(other, req)                # now both hold the prefix: the least loaded holder wins
    first.num_unfinished, other.num_unfinished = 1, 0
    assert s.select(ns, req) is other
    first.num_unfinished, other.num_unfinished = 0, 1
    assert s.select(ns, req) is first


def test_prefix_aware_longest_match_wins_and_forget_node():
    ns = nodes(2)
    s = PrefixAware(block_chars=16, rng=random.Random(0))
    base = "common " * 30
    short, long_ = chat(base, "x"), RouteRequest({"model": "m", "messages": [
        {"role": "system", "content": base}, {"role": "user", "content": "tail " * 40}]})
    s.on_routed(ns[0], short)
    s.on_routed(ns[1], long_)
    probe = RouteRequest({"model": "m", "messages": [{"role": "system", "content": base},
                                                     {"role": "user", "content": "tail " * 40 + "more"}]})
    assert s.select(ns, probe) is ns[1]
    s.forget_node(ns[1].url)
    assert s.select(ns, probe) is ns[0]
    assert all(ns[1].url not in holders for holders in s.table.values())


def test_prefix_aware_table_is_bounded():
    s = PrefixAware(block_chars=4, table_size=10)
    for i in range(50):
        s.on_routed(nodes(1)[0], RouteRequest({"prompt": f"{i:04d}" * 3}))
    assert len(s.table) == 10


def test_route_request_session_id():
    assert RouteRequest({"session_id": 5}).session_id == 5
    assert RouteRequest({"session_id": -1}).session_id is None    # LMDeploy's "no session"
    assert RouteRequest({"session_id": True}).session_id is None
    assert RouteRequest({}).session_id is None


def test_session_table_lru_and_forget():
    t = SessionTable(max_sessions=2)
    t.pin(1, "a"), t.pin(2, "b")
    assert t.lookup(1) == "a"
    t.pin(3, "c")                           # 2 is the least recently used
    assert t.lookup(2) is None and t.lookup(1) == "a"
    t.forget_node("a")
    assert t.lookup(1) is None


def test_make_strategy():
    config = ProxyConfig(strategy="prefix_aware", prefix_block_chars=64, balance_factor=2.0)
    s = make_strategy("prefix_aware", config)
    assert isinstance(s, PrefixAware) and s.block_chars == 64 and s.balance_factor == 2.0
    for name in ("random", "min_expected_latency", "min_observed_latency"):
        assert make_strategy(name).name == name
    with pytest.raises(ValueError):
        make_strategy("round_robin")
    with pytest.raises(ValueError, match="strategy"):
        ProxyConfig(strategy="nope")


def test_registry_candidates_and_persistence(tmp_path):
    path = tmp_path / "sub" / "nodes.json"
    reg = NodeRegistry(str(path))
    a = reg.add("127.0.0.1:1", models=["m1"], speed=2)
    b = reg.add("http://127.0.0.1:2/", models=["m2"])
    reg.add("http://127.0.0.1:3")                         # models unknown yet: never routable
    assert reg.candidates("m1") == []                     # not healthy yet
    a.mark_healthy(), b.mark_healthy()
    assert reg.candidates("m1") == [a] and set(reg.candidates(None)) == {a, b}
    assert reg.routable_models() == ["m1", "m2"] and reg.known_models() == {"m1", "m2"}
    saved = json.loads(path.read_text())
    assert [n["url"] for n in saved["nodes"]] == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
    removed = []
    reg.removal_listeners.append(removed.append)
    reg.remove("127.0.0.1:2")
    assert removed == ["http://127.0.0.1:2"]
    again = NodeRegistry(str(path))
    assert list(again.nodes) == ["http://127.0.0.1:1", "http://127.0.0.1:3"]
    assert again.get("http://127.0.0.1:1").speed == 2 and again.get("http://127.0.0.1:1").models == ["m1"]
    assert not again.get("http://127.0.0.1:1").is_healthy    # restored nodes wait for a health check


def test_registry_survives_a_corrupt_node_file(tmp_path):
    path = tmp_path / "nodes.json"
    path.write_text("{not json")
    assert len(NodeRegistry(str(path))) == 0


def test_proxy_does_not_import_torch_or_the_engine():
    """The proxy package must run without torch: no module in it imports torch, the engine or the model."""
    banned = ("torch", "lmserve.engine", "lmserve.model", "lmserve.config", "lmserve.tokenizer")
    for path in pathlib.Path("lmserve/proxy").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(banned), f"{path} imports {name}"


def test_proxy_process_never_loads_torch():
    """Building the proxy app and its CLI parser leaves torch unloaded (the proxy runs on machines without it)."""
    import subprocess
    import sys
    code = ("import sys; from lmserve.cli import build_parser; from lmserve.proxy.app import build_app; "
            "build_parser().parse_args(['serve', 'proxy']); build_app(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
