"""engine/kv_transfer.py without a model: a BlockServer over small random KV tensors, pulled over loopback TCP."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from lmserve.engine.kv_transfer import (BlockServer, MigrationError, hello, kv_layout, layout_mismatch, pull_blocks,
                                        write_blocks)


def fake_runner(num_blocks=12, block_size=4, layers=3, heads=2, head_dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    caches = [tuple(torch.randn(num_blocks * block_size, heads, head_dim, generator=g).to(dtype) for _ in range(2))
              for _ in range(layers)]
    return SimpleNamespace(kv_caches=caches, block_size=block_size, kv_dtype=dtype,
                           arch=SimpleNamespace(num_hidden_layers=layers, head_dim=head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pull_copies_whole_blocks_and_frees(dtype):
    src, dst = fake_runner(dtype=dtype), fake_runner(dtype=dtype, seed=1)
    pinned = {7: [3, 9, 1, 4, 10, 2, 5]}     # more blocks than one read: several reads in flight
    freed = []
    server = BlockServer(src, "127.0.0.1", pinned.get, freed.append)
    try:
        assert hello(server.address, 5) == kv_layout(src)
        blocks = pull_blocks(server.address, 7, 7, timeout=5, chunk=2, window=3)
        dst_ids = [11, 0, 6, 8, 7, 3, 1]
        write_blocks(dst, dst_ids, blocks)
        bs = src.block_size
        for (sk, sv), (dk, dv) in zip(src.kv_caches, dst.kv_caches):
            for s, d in zip(pinned[7], dst_ids):
                assert torch.equal(sk[s * bs:(s + 1) * bs], dk[d * bs:(d + 1) * bs])
                assert torch.equal(sv[s * bs:(s + 1) * bs], dv[d * bs:(d + 1) * bs])
        deadline = time.monotonic() + 5
        while not freed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert freed == [7]
    finally:
        server.close()


def test_refusals():
    runner = fake_runner()
    server = BlockServer(runner, "127.0.0.1", {1: [2, 3]}.get, lambda sid: None)
    try:
        with pytest.raises(MigrationError) as e:
            pull_blocks(server.address, 99, 1, timeout=5)
        assert e.value.status == 400 and e.value.param == "migration_request.remote_session_id"
        with pytest.raises(MigrationError) as e:
            pull_blocks(server.address, 1, 3, timeout=5)      # more blocks than the session keeps
        assert e.value.param == "migration_request.remote_block_ids"
    finally:
        server.close()
    with pytest.raises(MigrationError) as e:                 # nobody listens: bounded wait, then an error
        pull_blocks(server.address, 1, 2, timeout=0.5)
    assert e.value.status == 502
    assert "block_size" in layout_mismatch(kv_layout(runner), kv_layout(fake_runner(block_size=8)))
    assert "dtype" in layout_mismatch(kv_layout(runner), kv_layout(fake_runner(dtype=torch.bfloat16)))
    assert layout_mismatch(kv_layout(runner), kv_layout(fake_runner(seed=3))) is None
