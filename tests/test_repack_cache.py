"""The repack cache (model/repack_cache.py): the first start writes the repacked matrices to a file and serves them
from its shared mapping, later starts map it without repacking, with the same tokens as a private repack; a changed
GGUF gets a new entry (the old one, and the entries of deleted GGUFs, removed), a broken entry is rebuilt, and a cache that cannot be written (not a
directory, no room, a failed write) leaves the weights in private memory without failing the start."""
from __future__ import annotations

import fcntl
import json
import os
import sys

import numpy as np
import pytest
import torch

from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.model import repack_cache
from lmserve.ops import cpu_kernels
from lmserve.ops.gguf_blocks import REPACKED
from lmserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="C++ kernels could not be built here")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(arch="llama", hidden=256, layers=2, ffn=768, heads=4, kv_heads=2, tied=False, bias=False, theta=10000.0)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    """A Q4_K_M file (Q4_K and Q6_K matrices, both repacked), SmolLM2's vocabulary."""
    sys.path.insert(0, ROOT)
    from benchmarks.synthetic_gguf import write_synthetic_gguf
    path = str(tmp_path_factory.mktemp("repack_cache") / "tiny-q4_k_m.gguf")
    write_synthetic_gguf(path, SHAPE, "Q4_K_M", context_length=256)
    return path


@pytest.fixture(autouse=True)
def ample_disk(monkeypatch):
    """The entries here are a few MiB, but the cache keeps 5% of the disk free (12.6 GiB of a 252 GB one), more
    than a shared host may have left: these tests are about the cache, not about this machine's disk, so the disk
    reads as roomy unless a test fakes it full (its own monkeypatch comes later and wins)."""
    real = repack_cache.shutil.disk_usage

    def usage(path):
        u = real(path)
        return type(u)(total=u.total, used=0, free=max(u.free, u.total))
    monkeypatch.setattr(repack_cache.shutil, "disk_usage", usage)


def _engine(path: str, cache: str) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, quant_activations="int8", gguf_repack="auto",
                                                      gguf_repack_cache=cache),
                                    cache=CacheConfig(kv_cache_memory=16 << 20)))
    repack_cache.wait_for_writes()      # the entry is renamed into place by a thread once it is on disk
    return engine


def _greedy(engine: LLMEngine) -> list[int]:
    engine.add_request("r", [1, 50, 700, 3000, 12000], SamplingParams(max_tokens=12, temperature=0,
                                                                      ignore_eos=True))
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out = list(o.outputs[0].token_ids)
    engine.shutdown()
    return out


def _packed_parts(engine: LLMEngine) -> list:
    return [p for m in engine.runner.model.modules() if hasattr(m, "linear_method")
            for p in getattr(m.linear_method, "parts", []) if p.qtype in REPACKED]


def _mapped_from(engine: LLMEngine, path: str) -> bool:
    """Whether every repacked matrix lies in this process's mapping of `path` (/proc/self/maps)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == os.path.realpath(path):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    parts = _packed_parts(engine)
    return bool(parts) and all(any(lo <= p.data.data_ptr() and p.data.data_ptr() + p.nbytes <= hi
                                   for lo, hi in spans) for p in parts)


def _entries(cache) -> list[str]:
    return sorted(e for e in os.listdir(cache) if not e.startswith("."))


@pytest.fixture(scope="module")
def private_tokens(gguf) -> list[int]:
    engine = _engine(gguf, "none")
    parts = _packed_parts(engine)
    assert parts and all(p.owned for p in parts)      # without a cache: private copies
    return _greedy(engine)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_first_start_writes_the_entry_later_starts_map_it(gguf, private_tokens, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = _engine(gguf, cache)       # (_engine waits for the entry's rename; the start itself does not)
    entries = _entries(cache)
    assert len(entries) == 2 and entries[0].endswith(".bin") and entries[1].endswith(".json"), entries
    bin_path = os.path.join(cache, entries[0])
    parts = _packed_parts(first)
    assert {p.qtype for p in parts} == {"Q4_Kx8", "Q6_Kx8"}
    assert not any(p.owned for p in parts) and _mapped_from(first, bin_path)
    stats = first.get_stats(memory=True).memory
    assert stats["weights_gguf_repacked"] == 0 < stats["weights_gguf_repacked_shared"]
    assert _greedy(first) == private_tokens

    # a later start maps the entry: no repack at all, the same bytes, the same tokens
    def no_repack(*a, **k):
        raise AssertionError("repacked although the cache has the entry")
    monkeypatch.setattr("lmserve.model.gguf_weights.repacked", no_repack)
    index = os.path.join(cache, entries[1])
    os.utime(index, (1, 1))
    second = _engine(gguf, cache)
    assert _mapped_from(second, bin_path) and _entries(cache) == entries
    assert os.stat(index).st_mtime > 1            # a start that maps the entry marks it used
    with open(bin_path, "rb") as f, pytest.raises(BlockingIOError):    # mapped: held against _make_room
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    for a, b in zip(_packed_parts(second), parts):
        assert a.qtype == b.qtype and a.shape == b.shape and torch.equal(a.data, b.data)
    assert _greedy(second) == private_tokens


def test_a_changed_file_gets_a_new_entry_and_the_old_one_goes(gguf, private_tokens, tmp_path):
    cache = str(tmp_path / "cache")
    _engine(gguf, cache).shutdown()
    old = _entries(cache)
    st = os.stat(gguf)
    try:
        os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))    # what a rewritten file looks like
        # a dead writer's leftover goes too, and the entry of a GGUF that is gone; another file's entry stays
        leftover = os.path.join(cache, f".tmp-{2**22 + 12345}-x.bin")
        other = os.path.join(cache, "other-000000000000-000000000000-llama-tp0of1")
        gone = os.path.join(cache, "gone-000000000000-000000000000-llama-tp0of1")
        for p in (leftover, other + ".bin", gone + ".bin"):
            open(p, "wb").close()
        for p, source in ((other, gguf), (gone, str(tmp_path / "deleted.gguf"))):
            with open(p + ".json", "w") as f:
                json.dump({"format": repack_cache.FORMAT, "source": source}, f)
        engine = _engine(gguf, cache)
        new = _entries(cache)
        assert len(new) == 4 and set(new).isdisjoint(old), (old, new)
        assert {other + ".bin", other + ".json"} <= {os.path.join(cache, e) for e in new}
        assert not os.path.exists(leftover) and not os.path.exists(gone + ".bin")
        assert _greedy(engine) == private_tokens
    finally:
        os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_file_rewritten_in_place_with_its_size_and_mtime_gets_a_new_entry(gguf, tmp_path):
    """`cp -p` of another file of the same size over the GGUF keeps path, size, mtime and inode: the sampled bytes
    tell the entries apart."""
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(open(gguf, "rb").read())
    cfg = type("Cfg", (), {"architecture": "llama", "tp_rank": 0, "tp_size": 1})()
    before = repack_cache.RepackCache(str(tmp_path), str(copy), cfg).name
    st = os.stat(copy)
    with open(copy, "r+b") as f:         # the same header, other weights: the file's second half changed
        f.seek(st.st_size // 2)
        rest = np.frombuffer(f.read(), dtype=np.uint8)
        f.seek(st.st_size // 2)
        f.write((rest ^ 0x5A).tobytes())
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(copy)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert repack_cache.RepackCache(str(tmp_path), str(copy), cfg).name != before


def test_a_broken_entry_is_rebuilt(gguf, private_tokens, tmp_path):
    cache = str(tmp_path / "cache")
    _engine(gguf, cache).shutdown()
    bin_path = os.path.join(cache, _entries(cache)[0])
    size = os.path.getsize(bin_path)
    with open(bin_path, "r+b") as f:
        f.truncate(size // 2)                          # a .bin that is not whole: ignored, written again
    engine = _engine(gguf, cache)
    assert os.path.getsize(bin_path) == size and _mapped_from(engine, bin_path)
    assert _greedy(engine) == private_tokens


@pytest.mark.parametrize("how", ["not a directory", "disk full", "mapping fails"])
def test_a_cache_that_cannot_be_written_keeps_private_copies(how, gguf, private_tokens, tmp_path, monkeypatch,
                                                             caplog):
    cache = tmp_path / "cache"
    if how == "not a directory":
        cache.write_text("")
    elif how == "mapping fails":         # the matrices already written are read back into memory
        def no_map(*a, **k):
            raise OSError(12, "Cannot allocate memory")
        monkeypatch.setattr(repack_cache.RepackCache, "_map", no_map)
    else:
        class Usage:
            free, total = 10 << 20, 100 << 30
        monkeypatch.setattr(repack_cache.shutil, "disk_usage", lambda _: Usage)
    engine = _engine(gguf, str(cache))
    parts = _packed_parts(engine)
    assert parts and all(p.owned for p in parts)
    assert "repack cache" in caplog.text and "private memory" in caplog.text
    assert _greedy(engine) == private_tokens
    if how != "not a directory":
        assert not os.listdir(cache)          # no entry, no temporary file left


def test_a_full_disk_gives_up_the_entries_used_longest_ago_that_nothing_maps(gguf, tmp_path, monkeypatch):
    """Short of room for a new entry, other GGUFs' entries go, least recently used first, except one a process maps
    (a shared flock); where even that is not enough, no writer and the mapped entry stays."""
    cache = tmp_path / "cache"
    cache.mkdir()
    mib = 1 << 20
    for age, name in enumerate(["a", "b", "c", "d"]):
        stem = str(cache / f"{name}-000000000000-000000000000-llama-tp0of1")
        with open(stem + ".bin", "wb") as f:
            f.write(b"x" * mib)
        with open(stem + ".json", "w") as f:
            json.dump({"format": repack_cache.FORMAT, "source": gguf}, f)
        os.utime(stem + ".json", (1000 + age, 1000 + age))
    held = open(str(cache / "a-000000000000-000000000000-llama-tp0of1.bin"), "rb")    # "a" is mapped elsewhere
    fcntl.flock(held.fileno(), fcntl.LOCK_SH)
    room = {"disk": 0}

    class Usage:        # free = what the cache's .bin files leave of `disk`; 20 GiB disk: 1 GiB kept free
        total = 20 << 30

        def __init__(self, _):
            used = sum(os.path.getsize(cache / e) for e in os.listdir(cache) if e.endswith(".bin"))
            self.free = room["disk"] - used
    monkeypatch.setattr(repack_cache.shutil, "disk_usage", Usage)
    cfg = type("Cfg", (), {"architecture": "llama", "tp_rank": 0, "tp_size": 1})()
    entry = repack_cache.RepackCache(str(cache), gguf, cfg)
    need = mib + repack_cache.SPARE
    room["disk"] = need + 4 * mib - mib // 2     # one entry short by half of one: "b" (oldest not mapped) goes
    writer = entry.writer(mib)
    assert writer is not None
    writer._discard()
    assert [e[0] for e in _entries(str(cache))] == ["a", "a", "c", "c", "d", "d"]
    room["disk"] = need + mib // 2               # now "c" and "d" go too, and it is still not enough
    assert entry.writer(mib) is None
    assert _entries(str(cache)) == ["a-000000000000-000000000000-llama-tp0of1.bin",
                                    "a-000000000000-000000000000-llama-tp0of1.json"]
    held.close()


def test_an_entry_not_made_on_disk_still_serves_this_start(gguf, private_tokens, tmp_path, monkeypatch, caplog):
    """The fsync (in a thread, after the start) fails: this process keeps serving from the written file, now
    unnamed; no entry is left for the next start to trust."""
    def fsync(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(repack_cache.os, "fsync", fsync)
    cache = tmp_path / "cache"
    engine = _engine(gguf, str(cache))
    parts = _packed_parts(engine)
    assert parts and not any(p.owned for p in parts)
    assert "could not make the entry" in caplog.text and not os.listdir(cache)
    assert _greedy(engine) == private_tokens


def test_the_flag_and_its_default(monkeypatch, tmp_path):
    import argparse

    from lmserve.cli.engine_args import add_engine_args, build_engine_config
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["m.gguf", "--gguf-repack-cache", "none"])
    assert build_engine_config(args).model.gguf_repack_cache == "none"
    assert parser.parse_args(["m.gguf"]).gguf_repack_cache == "auto"
    assert repack_cache.repack_cache_dir("none") is None
    monkeypatch.setenv("LMSERVE_REPACK_CACHE", str(tmp_path))
    assert repack_cache.repack_cache_dir("auto") == str(tmp_path)
    monkeypatch.setenv("LMSERVE_REPACK_CACHE", "none")
    assert repack_cache.repack_cache_dir("auto") is None
    monkeypatch.delenv("LMSERVE_REPACK_CACHE")
    assert repack_cache.repack_cache_dir("auto") == os.path.expanduser("~/.cache/lmserve/repacked")
    assert repack_cache.repack_cache_dir("~/x") == os.path.expanduser("~/x")
