"""The C++ kernels (lmserve/ops CPU arms) against the pure-PyTorch references (the oracle), on random paged caches."""
from __future__ import annotations

import pytest
import torch

from lmserve import ops
from lmserve.model.attention import AttentionGroup, AttentionMetadata, DecodeBatch, paged_attention
from lmserve.ops import cpu_kernels

kernel = cpu_kernels.load()
CPU_OPS = ops.select("cpu", torch.float32, "auto", lib=kernel) if kernel is not None else None
pytestmark = pytest.mark.skipif(kernel is None, reason="C++ kernel could not be built here")

BS = 16


def random_case(num_seqs, num_kv_heads, group, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 256
    kc = torch.randn(num_blocks * BS, num_kv_heads, head_dim, generator=g)
    vc = torch.randn(num_blocks * BS, num_kv_heads, head_dim, generator=g)
    kc[:BS] = 0
    vc[:BS] = 0
    ctx = torch.randint(1, 120, (num_seqs,), generator=g).tolist()
    tables = [(torch.randperm(num_blocks - 1, generator=g)[: -(-c // BS)] + 1).tolist() for c in ctx]
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=g)
    return q, kc, vc, ctx, tables


def reference(q, kc, vc, ctx, tables, window):
    max_ctx = max(ctx)
    pos = torch.arange(max_ctx)
    tab = torch.tensor([t + [0] * (-(-max_ctx // BS) - len(t)) for t in tables])
    c = torch.tensor(ctx).unsqueeze(1)
    valid = pos[None] < c
    slots = torch.where(valid, tab[:, pos // BS] * BS + pos % BS, 0)
    mask = valid if window is None else valid & (pos[None] > c - 1 - window)
    group = AttentionGroup(torch.arange(len(ctx)).unsqueeze(1), slots, mask[:, None, None, :])
    return paged_attention(q, kc, vc, AttentionMetadata(torch.zeros(0, dtype=torch.long), [group]),
                           q.shape[-1] ** -0.5)


@pytest.mark.parametrize("num_kv_heads,group,head_dim,window", [(3, 3, 64, None), (2, 2, 32, None),
                                                                (4, 1, 16, None), (2, 4, 64, 20),
                                                                (1, 8, 64, None), (2, 3, 128, 37),
                                                                (2, 7, 128, None), (1, 4, 256, 30),
                                                                (2, 1, 256, None), (1, 5, 64, None)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(num_kv_heads, group, head_dim, window, cache_dtype):
    q, kc, vc, ctx, tables = random_case(9, num_kv_heads, group, head_dim, seed=head_dim + group)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)   # the reference widens a bfloat16 cache the same way
    max_blocks = max(len(t) for t in tables)
    decode = DecodeBatch(None, torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]), torch.tensor(ctx))
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), [], decode, BS, window)
    with ops.use(CPU_OPS):
        out = paged_attention(q, kc, vc, meta, head_dim ** -0.5)
    torch.testing.assert_close(out, reference(q, kc, vc, ctx, tables, window), atol=1e-5, rtol=1e-5)


def test_kernel_on_subset_of_rows_mixed_with_groups():
    q, kc, vc, ctx, tables = random_case(5, 2, 3, 32, seed=7)
    # rows 0, 2, 4 are decodes (kernel); rows 1, 3 go through a reference group
    rows = [0, 2, 4]
    max_blocks = max(len(tables[r]) for r in rows)
    decode = DecodeBatch(torch.tensor(rows), torch.tensor([tables[r] + [0] * (max_blocks - len(tables[r]))
                                                           for r in rows]), torch.tensor([ctx[r] for r in rows]))
    ref = reference(q, kc, vc, ctx, tables, None)
    other = [1, 3]
    sub = reference(q[other], kc, vc, [ctx[r] for r in other], [tables[r] for r in other], None)
    assert torch.allclose(sub, ref[other], atol=1e-6)
    max_ctx = max(ctx[r] for r in other)
    pos = torch.arange(max_ctx)
    tab = torch.tensor([tables[r] + [0] * (-(-max_ctx // BS) - len(tables[r])) for r in other])
    c = torch.tensor([ctx[r] for r in other]).unsqueeze(1)
    valid = pos[None] < c
    group = AttentionGroup(torch.tensor(other).unsqueeze(1), torch.where(valid, tab[:, pos // BS] * BS + pos % BS, 0),
                           valid[:, None, None, :])
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), [group], decode, BS, None)
    with ops.use(CPU_OPS):
        out = paged_attention(q, kc, vc, meta, 32 ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs,q_len,num_kv_heads,group,head_dim", [(1, 1, 1, 4, 64), (1, 5, 2, 2, 64),
                                                                   (2, 37, 2, 3, 32), (1, 100, 1, 7, 128),
                                                                   (1, 130, 8, 1, 256), (3, 17, 4, 1, 40),
                                                                   (1, 300, 8, 4, 64)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_causal_prefill_kernel_matches_sdpa(seqs, q_len, num_kv_heads, group, head_dim, cache_dtype):
    """Whole prompts (a group with no mask): the online-softmax kernel against SDPA's causal path, through the op
    layer; q lengths off the 16-query and 64-key blocks, GQA groups that leave partial 4-row tiles (7 x 1 rows),
    head_dim 40 on the kernel's scalar loops."""
    g = torch.Generator().manual_seed(q_len + head_dim)
    kc = torch.randn(64 * BS, num_kv_heads, head_dim, generator=g).to(cache_dtype)
    vc = torch.randn(64 * BS, num_kv_heads, head_dim, generator=g).to(cache_dtype)
    q = torch.randn(seqs * q_len + 3, num_kv_heads * group, head_dim, generator=g)   # 3 rows of other requests
    token_index = (torch.randperm(seqs * q_len + 3, generator=g)[: seqs * q_len]).reshape(seqs, q_len)
    kv_slots = torch.randperm(64 * BS - BS, generator=g)[: seqs * q_len].reshape(seqs, q_len) + BS
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), [AttentionGroup(token_index, kv_slots, None)])
    with ops.use(CPU_OPS):
        out = paged_attention(q, kc, vc, meta, head_dim ** -0.5)
    ref = paged_attention(q, kc, vc, meta, head_dim ** -0.5)           # no table active: SDPA (the reference)
    rows = token_index.reshape(-1)
    torch.testing.assert_close(out[rows], ref[rows], atol=2e-6, rtol=1e-5)


def _chunk_group(start, n, slots, first_row):
    """The group build_attention_metadata makes for n new tokens after `start` cached ones (a later chunk, a
    prefix-cache hit): an explicit causal mask for SDPA, causal_start for the kernel."""
    pos = torch.arange(start + n)
    mask = pos[None] <= torch.arange(start, start + n)[:, None]
    return AttentionGroup(torch.arange(first_row, first_row + n)[None], slots[None, : start + n], mask[None, None],
                          causal_start=start)


@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(2, 3, 64), (1, 7, 128), (3, 1, 40)])
def test_causal_prefill_kernel_after_cached_positions(num_kv_heads, group, head_dim):
    """Queries after `start` cached positions: the kernel (with its offset) against SDPA under the explicit mask,
    and bit for bit the rows the same prompt gets when prefilled whole, however it is split: chunks and
    prefix-cache hits cannot change a greedy token (CI once saw a proxied request diverge from a direct one while
    whole prompts took the kernel and prefix-cache hits SDPA)."""
    g = torch.Generator().manual_seed(head_dim)
    total = 203
    kc = torch.randn(32 * BS, num_kv_heads, head_dim, generator=g)
    vc = torch.randn(32 * BS, num_kv_heads, head_dim, generator=g)
    q = torch.randn(total, num_kv_heads * group, head_dim, generator=g)
    slots = torch.randperm(32 * BS - BS, generator=g)[:total] + BS
    scale = head_dim ** -0.5
    whole = AttentionGroup(torch.arange(total)[None], slots[None], None)
    with ops.use(CPU_OPS):
        ref = paged_attention(q, kc, vc, AttentionMetadata(torch.zeros(0, dtype=torch.long), [whole]), scale)
    for cuts in ([16], [64, 150], [1, 2, 130], [202]):
        bounds = [0, *cuts, total]
        groups = [_chunk_group(a, b - a, slots, a) for a, b in zip(bounds, bounds[1:]) if a > 0]
        meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), groups)
        with ops.use(CPU_OPS):
            out = paged_attention(q, kc, vc, meta, scale)
        sdpa = paged_attention(q, kc, vc, meta, scale)
        rows = slice(cuts[0], total)
        torch.testing.assert_close(out[rows], sdpa[rows], atol=2e-6, rtol=1e-5)
        assert torch.equal(out[rows], ref[rows]), (cuts, (out[rows] - ref[rows]).abs().max())


# ---- fused elementwise kernels against their PyTorch reference --------------------------------------------
def test_rms_norm_kernels_match_reference():
    from lmserve.model.layers import RMSNorm
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576, generator=g)
    x, res = torch.randn(37, 576, generator=g) * 3, torch.randn(37, 576, generator=g)
    ref = norm(x)
    with ops.use(CPU_OPS):
        torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)
    ref_out, ref_res = norm(x, res)
    with ops.use(CPU_OPS):
        out, new_res = norm(x.clone(), res.clone())
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_rms_norm_heads_matches_the_per_head_norms():
    # Qwen3 / Gemma 3: q and k heads of the fused qkv normed in place (own weights), v left alone
    g = torch.Generator().manual_seed(3)
    nh, nkv, hd, T = 6, 2, 64, 7
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=g) * 3
    qw, kw = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    rq = torch.nn.functional.rms_norm(q.reshape(T, nh, hd), (hd,), qw, 1e-6).reshape(T, -1)
    rk = torch.nn.functional.rms_norm(k.reshape(T, nkv, hd), (hd,), kw, 1e-6).reshape(T, -1)
    for table in (None, CPU_OPS):
        with ops.use(table):
            out = ops.rms_norm_heads(qkv.clone(), qw, kw, nh, nkv, hd, 1e-6)
        torch.testing.assert_close(out, torch.cat([rq, rk, v], dim=-1), rtol=1e-5, atol=1e-5)
        assert torch.equal(out[:, (nh + nkv) * hd:], v)


def test_silu_mul_matches_reference():
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(9, 2 * 1539, generator=g) * 8   # odd width: the scalar tail runs too
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])
    out = torch.empty(9, 1539)
    kernel.silu_mul(out, gate_up)
    gate, up = gate_up.split(1539, dim=-1)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rotary", [64, 32, 48])     # the whole head; partial rotary (phi3: the rest passes)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_matches_reference(cache_dtype, rotary):
    from lmserve.model.layers import RotaryEmbedding
    g = torch.Generator().manual_seed(2)
    nh, nkv, hd, T = 6, 2, 64, 11
    rope = RotaryEmbedding(rotary, 4096, 10000.0)
    pos = torch.randint(0, 4000, (T,), generator=g)
    cos, sin = rope.lookup(pos, torch.float32)
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=g)
    slots = torch.randperm(64, generator=g)[:T]
    kc, vc = torch.zeros(64, nkv, hd, dtype=cache_dtype), torch.zeros(64, nkv, hd, dtype=cache_dtype)
    q = torch.empty(T, nh, hd)
    kernel.rope_write_kv(q, qkv, cos, sin, kc, vc, slots, nh, nkv, hd)
    rq, rk, rv = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    rq, rk = RotaryEmbedding.apply(rq.reshape(T, nh, hd), rk.reshape(T, nkv, hd), cos, sin)
    torch.testing.assert_close(q, rq, rtol=0, atol=0)
    torch.testing.assert_close(kc[slots], rk.to(cache_dtype), rtol=0, atol=0)
    torch.testing.assert_close(vc[slots], rv.reshape(T, nkv, hd).to(cache_dtype), rtol=0, atol=0)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not kc[untouched].any() and not vc[untouched].any()


# ---- the op layer: selection and the references that have no kernel to be checked against ---------------------
def test_select_picks_kernels_or_references():
    assert set(CPU_OPS.arms) >= {"rms_norm", "add_rms_norm", "silu_mul", "gelu_mul", "rope_write_kv", "gguf_matmul",
                                 "decode_attention", "prefill_attention"}
    assert CPU_OPS.arms["decode_attention"] == "cpu" and CPU_OPS.arms["gelu_mul"] == "native"
    forced = ops.select("cpu", torch.float32, "torch")
    assert set(forced.arms.values()) == {"native"} and forced.lib is None
    assert set(ops.select("cpu", torch.bfloat16, "auto").arms.values()) == {"native"}   # CPU arms are float32 only
    assert ops.current().arms["rms_norm"] == "native"             # nothing activated: the references
    with ops.use(CPU_OPS):
        assert ops.current() is CPU_OPS
    assert ops.current().arms["rms_norm"] == "native"


@pytest.mark.parametrize("window", [None, 9])
def test_native_decode_attention_equals_group_reference(window):
    q, kc, vc, ctx, tables = random_case(6, 2, 3, 32, seed=11)
    max_blocks = max(len(t) for t in tables) + 2       # tables may be wider than the context needs
    decode = DecodeBatch(None, torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]), torch.tensor(ctx))
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), [], decode, BS, window)
    out = paged_attention(q, kc, vc, meta, 32 ** -0.5)        # no table active: ops.decode_attention reference
    torch.testing.assert_close(out, reference(q, kc, vc, ctx, tables, window), atol=1e-6, rtol=1e-6)


def test_gelu_mul_matches_transformers_activation():
    from transformers.activations import ACT2FN
    g = torch.Generator().manual_seed(4)
    gate_up = torch.randn(7, 2 * 48, generator=g) * 4
    gate, up = gate_up.split(48, dim=-1)
    torch.testing.assert_close(ops.gelu_mul(gate_up), ACT2FN["gelu_pytorch_tanh"](gate) * up, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.gelu_mul(gate_up, "none"), ACT2FN["gelu"](gate) * up, rtol=1e-6, atol=1e-6)
