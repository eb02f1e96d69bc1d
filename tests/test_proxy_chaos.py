"""Chaos, bounded (the full 3-minute run is benchmarks/chaos.py, results in docs/benchmarks.md): three fake nodes
(subprocesses, so they can be SIGKILLed) behind a real `lmserve serve proxy`, 8 concurrent clients for 16 s,
mixed streaming and not, sessions, shared prefixes; one node SIGKILLed and restarted every 4 s in turn."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import chaos  # noqa: E402

HEALTH_INTERVAL = 0.5


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_proxy_loses_nothing_while_nodes_die(tmp_path):
    result = chaos.chaos(_args(tmp_path))
    counts = result["counts"]
    assert result["kills"] >= 3, result
    assert counts.get("plain_ok", 0) > 50 and counts.get("stream_complete", 0) > 50, result
    for bad in ("plain_lost", "stream_lost", "stream_cut_silently", "over_timeout"):
        assert counts.get(bad, 0) == 0, (bad, result["examples"].get(bad), result)
    for r in result["restarts"]:
        # back in rotation within one health interval of answering again (slack for a loaded 2-core machine)
        assert r.get("back_in_rotation_after_ready_s") is not None, result
        assert r["back_in_rotation_after_ready_s"] <= HEALTH_INTERVAL + 1.0, result
    assert all(b["state"] == "closed" for b in result["breakers_now"].values()), result


def _args(tmp_path):
    import argparse
    return argparse.Namespace(nodes="fake", proxy="lmserve", proxy_python=sys.executable, strategy="prefix_aware",
                              num_nodes=3, clients=8, duration=16.0, kill_every=4.0,
                              health_interval=HEALTH_INTERVAL, timeout=30.0, start_timeout=60.0,
                              log_dir=str(tmp_path), out=None)
