"""benchmarks/real_size.py's parts that can be checked without timing anything: the bytes-per-token count of a
GGUF, the memory cap on a measured server, and the report's ratios."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import membw  # noqa: E402
import real_size_report  # noqa: E402
import server_probe  # noqa: E402


def test_bytes_per_token_of_a_tied_gguf_is_its_matrices(smollm2_path):
    info = membw.gguf_bytes(smollm2_path)
    assert info["tied_output"] is True                      # SmolLM2's head is its token embedding
    assert info["bytes_per_token"] == sum(info["matrix_bytes_by_type"].values())
    assert 0.9 * info["file_bytes"] < info["bytes_per_token"] < info["file_bytes"]
    assert membw.bound_tok_s(10.0, info["bytes_per_token"]) == pytest.approx(10e9 / info["bytes_per_token"])


# a stand-in server: /health answers, then it grows to ~400 MB
_GROWING_SERVER = """
import sys, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
srv = HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
time.sleep(1.0)
blob = bytearray(400 * 2**20)
time.sleep(60)
"""


def test_a_server_passing_the_memory_cap_is_killed(tmp_path):
    port = server_probe.free_port()
    cmd = [sys.executable, "-c", _GROWING_SERVER, str(port)]
    srv = server_probe.Server(cmd, {}, port, str(tmp_path / "log"), max_rss_gib=0.25, startup_s=60, min_free_gib=0)
    with pytest.raises(server_probe.ServerError, match="RSS passed --max-rss-gib"):
        with srv:
            assert srv.memory()["rss"] > 0
            srv.proc.wait(30)                       # the watchdog kills it well before its 60 s are up
            raise server_probe.ServerError("the server outlived its memory cap")
    assert srv.proc.poll() is not None
    assert srv.peak_rss > 0.25 * 2**30


def _row(server, tok_s, rss, **extra):
    mem = {"rss": rss, "pss": rss // 2, "uss": rss // 2}
    return {"server": server, "c1_decode_tok_s": tok_s, "c16_output_tok_s": tok_s and 4 * tok_s, "c1_ttft_ms": 100.0,
            "pp512_tok_s": 50.0, "startup_s": 2.0, "mem_after_start": mem, "mem_after_run": mem,
            "peak_rss": rss, "loadavg_before": [0.5, 0.5, 0.5], **extra}


def test_report_takes_the_best_round_and_states_the_ratios():
    data = {"machine": {"model": "X", "cores": 2, "isa": ["avx2"]}, "mem_total_gib": 24,
            "read_bandwidth_gb_s": {"1t": 10.0, "2t": 12.0}, "lmserve": "abc", "llama_cpp": "def", "date": "now",
            "models": [{"model": "m", "file_bytes": 2**30, "bytes_per_token": 10**9, "bound_tok_s": {"1t": 10.0,
                                                                                                  "2t": 12.0},
                        "llama_bench": {"tg128": {"avg_ts": 9.0}, "pp512": {"avg_ts": 80.0}},
                        "runs": [_row("lmserve", 3.0, 2**30), _row("llama-server", 8.0, 2**29),
                                 _row("llama-server", 6.0, 2**29), _row("lmserve", 4.0, 2**30),
                                 _row("lmserve", None, 3 * 2**30, error="killed at RSS 3.0 GiB: RSS passed")]}]}
    md = real_size_report.markdown(data)
    assert "| 4.0 | 33% |" in md                   # lmserve's best round, against the 2-thread bound of 12 tok/s
    assert "**0.50x**" in md                        # 4.0 / 8.0
    assert "9.0 / 80.0" in md                       # llama-bench tg128 / pp512
    assert "killed at RSS 3.0 GiB" in md
    assert "RSS 6.00x" in md                        # the largest lmserve RSS seen (3 GiB) / llama-server's 0.5
