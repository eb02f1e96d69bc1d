"""benchmarks/peers_summary.py: rerunning some peers of run_peers.py replaces only their (peer, level) entries."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import peers_summary  # noqa: E402


def _metrics(tok_s: float, level: int) -> dict:
    return {"output_throughput": tok_s, "request_throughput": tok_s / 128, "completed": level, "failed": 0,
            "num_short_outputs": 0, "mean_decode_tok_s_per_request": tok_s * 1.1, "duration_s": 1.0,
            "max_concurrency": level, "ttft_ms": {"mean": 1, "median": 100.0, "p90": 1, "p99": 200.0},
            "itl_ms": {"mean": 1, "median": 1, "p90": 1, "p99": 30.0}}


def _entry(commit: str, **levels) -> dict:
    prov = {"date": "d", "commit": commit, "loadavg": [0.1, 0.1, 0.1], "cpu": "x"}
    return {"levels": {int(c[1:]): peers_summary.level_entry(_metrics(v, int(c[1:])), prov)
                       for c, v in levels.items()}}


def test_rerun_replaces_only_its_own_levels_and_ratios_follow(tmp_path):
    path = str(tmp_path / "summary.json")
    first = {"lmserve": _entry("aaa", c1=50.0, c64=600.0), "vllm": _entry("aaa", c1=20.0, c64=200.0),
             "llamacpp-inproc": {"inproc": {"decode_tok_s": 100.0, "method": "llama-bench", "commit": "aaa"}}}
    peers_summary.write(path, peers_summary.merge(peers_summary.load(path), first), {})

    # the integrator reruns only lmserve, only at c=1
    rerun = {"lmserve": _entry("bbb", c1=80.0)}
    table = peers_summary.merge(peers_summary.load(path), rerun)
    summary = peers_summary.write(path, table, {})

    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(summary))
    lm = on_disk["peers"]["lmserve"]["levels"]
    assert lm["1"]["output_throughput"] == 80.0 and lm["1"]["commit"] == "bbb"
    assert lm["64"]["output_throughput"] == 600.0 and lm["64"]["commit"] == "aaa"   # not rerun: kept
    assert on_disk["peers"]["vllm"]["levels"]["64"]["output_throughput"] == 200.0     # other peer: kept
    assert on_disk["peers"]["llamacpp-inproc"]["inproc"]["decode_tok_s"] == 100.0
    r = on_disk["lmserve_ratios"]["lmserve"]
    assert r["vllm"] == {"1": 4.0, "64": 3.0}
    assert abs(r["single_stream_vs_llamacpp_inproc"] - 0.88) < 1e-9   # 80 * 1.1 / 100
    assert on_disk["levels"] == [1, 64]
    text = peers_summary.table(table)
    assert "aaa,bbb" in text and "vllm: c=1: 4.00x, c=64: 3.00x" in text
    md = peers_summary.markdown(summary)
    assert "| lmserve | 80.0 | 600.0 | 0.20 s | 88.0 tok/s | aaa, bbb |" in md
    assert "- lmserve: vllm 4.00x / 3.00x (c=1/64); single_stream_vs_llamacpp_inproc 0.88x" in md


def test_an_older_summary_without_peer_entries_starts_a_new_table(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"levels": [1], "output_throughput": {"lmserve": {"1": 90.0}}}))
    assert peers_summary.load(str(path)) == {}
    assert peers_summary.load(str(tmp_path / "absent.json")) == {}


def test_provenance_names_the_commit_and_load():
    prov = peers_summary.provenance(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert prov["commit"] != "unknown" and len(prov["loadavg"]) == 3
    assert "avx2" in peers_summary.machine()["cpu_flags"] or peers_summary.machine()["cpu"] != "unknown"
