"""Sampler on hand-made logits: no model, no tokenizer."""
import math

import pytest
import torch

from lmserve.engine.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties,
    compute_logprobs,
)
from lmserve.engine.sequence import Sequence
from lmserve.sampling_params import SamplingParams

CPU = torch.device("cpu")
EOS = 7


def make_seq(prompt=(1, 2, 3), output=(), seed=None, **params) -> Sequence:
    params.setdefault("max_tokens", 100)
    seq = Sequence(0, "r", list(prompt), SamplingParams(seed=seed, **params), eos_token_ids=frozenset({EOS}))
    for tok in output:
        seq.append_token(tok)
    if seed is not None:
        seq.generator = torch.Generator().manual_seed(seed)
    return seq


def sample(seqs, logits):
    md = SamplingMetadata.from_sequences(seqs, logits.shape[-1], CPU)
    return Sampler()(logits.clone(), md)


def probs_logits(probs, rows=1):
    return torch.tensor(probs).log().repeat(rows, 1)


def frequencies(token_ids, vocab):
    return torch.bincount(torch.tensor(token_ids), minlength=vocab).float() / len(token_ids)


def test_greedy_variants_take_argmax():
    torch.manual_seed(0)
    logits = torch.randn(12, 50)
    seqs = [make_seq(temperature=0.0) for _ in range(4)] + [make_seq(top_k=1) for _ in range(4)] \
        + [make_seq(temperature=0.0, top_p=0.5, min_p=0.1) for _ in range(4)]
    md = SamplingMetadata.from_sequences(seqs, 50, CPU)
    assert md.all_greedy and md.temperature is None
    assert sample(seqs, logits).sampled_token_ids == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_unaffected_by_sampled_rows():
    torch.manual_seed(1)
    logits = torch.randn(6, 40)
    seqs = [make_seq(temperature=0.0 if i % 2 == 0 else 1.5, top_p=0.9) for i in range(6)]
    md = SamplingMetadata.from_sequences(seqs, 40, CPU)
    assert not md.all_greedy and not md.all_random and md.random_rows.tolist() == [1, 3, 5]
    out = sample(seqs, logits).sampled_token_ids
    assert out[0::2] == logits[0::2].argmax(-1).tolist()


def test_no_stage_built_for_defaults():
    md = SamplingMetadata.from_sequences([make_seq() for _ in range(3)], 10, CPU)
    assert md.all_random and md.no_penalties and md.no_top_k and md.no_top_p
    assert md.temperature is None and md.log_min_p is None and md.logit_bias is None
    assert md.min_tokens_mask is None and md.max_num_logprobs is None


def test_min_p_filters():
    torch.manual_seed(2)
    # p = [0.5, 0.3, 0.15, 0.05]; min_p = 0.2 -> keep p >= 0.1
    out = sample([make_seq(min_p=0.2)] * 4000, probs_logits([0.5, 0.3, 0.15, 0.05], 4000))
    freq = frequencies(out.sampled_token_ids, 4)
    assert freq[3] == 0 and (freq[:3] > 0.05).all()


@pytest.mark.parametrize("params, kept", [
    ({"top_p": 0.7}, {0, 1}),                  # mass above token 2 is 0.8 >= 0.7
    ({"top_p": 0.85}, {0, 1, 2}),
    ({"top_p": 0.3}, {0}),                     # the best token always stays
    ({"top_k": 2}, {0, 1}),
    ({"top_k": 3, "top_p": 0.7}, {0, 1}),
    ({"top_k": 2, "top_p": 0.95}, {0, 1}),
    ({"top_k": 3, "min_p": 0.4}, {0, 1}),      # min_p after top-k: 0.15 < 0.4 * 0.5
])
def test_top_k_top_p_keep_the_nucleus(params, kept):
    torch.manual_seed(3)
    n = 3000
    out = sample([make_seq(**params)] * n, probs_logits([0.5, 0.3, 0.15, 0.05], n))
    assert set(out.sampled_token_ids) == kept


def test_per_row_top_k_top_p_in_one_batch():
    torch.manual_seed(4)
    n = 500
    configs = [{}, {"top_k": 2}, {"top_p": 0.7}, {"top_k": 1}, {"top_k": 3, "top_p": 0.85}]
    expected = [{0, 1, 2, 3}, {0, 1}, {0, 1}, {0}, {0, 1, 2}]
    seqs = [make_seq(**c) for c in configs for _ in range(n)]
    out = sample(seqs, probs_logits([0.4, 0.3, 0.2, 0.1], len(seqs))).sampled_token_ids
    for i, kept in enumerate(expected):
        assert set(out[i * n:(i + 1) * n]) == kept, configs[i]


def test_repetition_penalty_changes_exactly_seen_tokens():
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, -1.0, 3.0]])
    seq = make_seq(prompt=[1, 2], output=[2, 3, 3], repetition_penalty=2.0)
    md = SamplingMetadata.from_sequences([seq], 6, CPU)
    apply_penalties(logits, md)
    assert logits.tolist() == [[1.0, 1.0, -4.0, 2.0, -1.0, 3.0]]


def test_presence_and_frequency_penalties_use_output_counts_only():
    logits = torch.zeros(1, 6)
    seq = make_seq(prompt=[1, 2], output=[2, 3, 3, 5, 3], presence_penalty=0.5, frequency_penalty=0.25)
    md = SamplingMetadata.from_sequences([seq], 6, CPU)
    apply_penalties(logits, md)
    expected = [0.0, 0.0, -(0.5 + 0.25), -(0.5 + 3 * 0.25), 0.0, -(0.5 + 0.25)]
    assert logits[0].tolist() == pytest.approx(expected)


def test_penalties_leave_other_rows_alone():
    torch.manual_seed(5)
    logits = torch.randn(3, 8)
    seqs = [make_seq(output=[1, 4]), make_seq(output=[1, 4], frequency_penalty=1.0), make_seq(output=[1, 4])]
    md = SamplingMetadata.from_sequences(seqs, 8, CPU)
    assert md.num_penalized == 1
    got = logits.clone()
    apply_penalties(got, md)
    expected = logits.clone()
    expected[1, [1, 4]] -= 1.0
    assert torch.equal(got, expected)


def test_logit_bias_forces_and_bans():
    torch.manual_seed(6)
    logits = torch.randn(4, 30)
    best = logits.argmax(-1)
    seqs = [make_seq(temperature=0.0, logit_bias={5: 100}), make_seq(logit_bias={"9": 100.0}),
            make_seq(temperature=0.0, logit_bias={int(best[2]): -100}),
            make_seq(temperature=0.0, logit_bias={int(best[3]): -100, 2: 100})]
    out = sample(seqs, logits).sampled_token_ids
    assert out[0] == 5 and out[1] == 9 and out[3] == 2
    assert out[2] != best[2] and out[2] == logits[2].topk(2).indices[1]


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = torch.zeros(5, 10)
    logits[:, EOS] = 50.0
    logits[:, 3] = 40.0
    logits[:, 4] = 30.0
    seqs = [make_seq(temperature=0.0, min_tokens=2, output=[1]),                  # EOS masked
            make_seq(temperature=0.0, min_tokens=2, output=[1], stop_token_ids=[3]),   # EOS and 3 masked
            make_seq(temperature=0.0, min_tokens=2, output=[1, 1]),               # reached: EOS allowed
            make_seq(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[3]),  # only 3 masked
            make_seq(min_tokens=3, output=[1])]                                   # sampled row too
    assert sample(seqs, logits).sampled_token_ids == [3, 4, EOS, EOS, 3]


def _run_seeded(seq_factory, others, steps=20, vocab=1000):
    """Sample `steps` tokens for a seeded row placed among `others` rows of random logits."""
    gen = torch.Generator().manual_seed(1234)
    target_logits = torch.randn(steps, vocab, generator=gen)
    seq = seq_factory()
    tokens = []
    for step in range(steps):
        batch = others() + [seq]
        logits = torch.randn(len(batch), vocab)
        logits[-1] = target_logits[step]
        tokens.append(sample(batch, logits).sampled_token_ids[-1])
    return tokens


def test_seeded_row_independent_of_batch():
    torch.manual_seed(7)
    def factory():
        return make_seq(seed=42, temperature=1.3, top_p=0.95)

    def crowd_of_varying_size():
        return [make_seq(top_k=5, seed=99) for _ in range(int(torch.randint(1, 9, ())))]

    alone = _run_seeded(factory, list)
    crowd = _run_seeded(factory, lambda: [make_seq() for _ in range(5)] + [make_seq(seed=7)]
                        + [make_seq(temperature=0.0)])
    other_crowd = _run_seeded(factory, crowd_of_varying_size)
    assert alone == crowd == other_crowd
    assert len(set(alone)) > 5            # actually sampled, not a constant


def test_different_seeds_differ():
    a = _run_seeded(lambda: make_seq(seed=1), list)
    b = _run_seeded(lambda: make_seq(seed=2), list)
    assert a != b
    assert a == _run_seeded(lambda: make_seq(seed=1), lambda: [make_seq()])


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(8)
    logits = torch.randn(4, 20)
    seqs = [make_seq(logprobs=3, temperature=0.7, repetition_penalty=1.5, logit_bias={0: 5}),
            make_seq(),
            make_seq(logprobs=0, temperature=0.0),
            make_seq(logprobs=5, top_k=3)]
    out = sample(seqs, logits)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for row, k in ((0, 3), (2, 0), (3, 5)):
        lp = out.logprobs[row]
        tok = out.sampled_token_ids[row]
        assert lp.token_id == tok and lp.logprob == pytest.approx(ref[row, tok].item(), abs=1e-6)
        top = ref[row].topk(k) if k else None
        assert [t for t, _ in lp.top] == ([] if k == 0 else top.indices.tolist())
        assert [v for _, v in lp.top] == pytest.approx([] if k == 0 else top.values.tolist(), abs=1e-6)


def test_no_logprobs_when_nobody_asks():
    assert sample([make_seq(), make_seq(temperature=0.0)], torch.randn(2, 10)).logprobs is None


def test_compute_logprobs_for_prompt_tokens():
    torch.manual_seed(9)
    logits = torch.randn(3, 12)
    ref = torch.log_softmax(logits, dim=-1)
    out = compute_logprobs(logits, [4, 0, 11], 2)
    assert [x.token_id for x in out] == [4, 0, 11]
    for i, x in enumerate(out):
        assert x.logprob == pytest.approx(ref[i, x.token_id].item(), abs=1e-6)
        assert x.top[0][0] == ref[i].argmax().item() and len(x.top) == 2
        assert x.top[0][1] >= x.top[1][1]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_distribution_matches_softmax(temperature):
    torch.manual_seed(10)
    p = torch.tensor([0.2, 0.3, 0.5])
    expected = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
    n = 20000
    out = sample([make_seq(temperature=temperature)] * n, p.log().repeat(n, 1))
    # 5 sigma for n = 20000 is about 0.018
    assert torch.allclose(frequencies(out.sampled_token_ids, 3), expected, atol=0.02)


def test_seeded_rows_distribution_matches_softmax():
    n = 3000
    p = torch.tensor([0.2, 0.3, 0.5])
    seqs = [make_seq(seed=i) for i in range(n)]
    out = sample(seqs, p.log().repeat(n, 1))
    assert torch.allclose(frequencies(out.sampled_token_ids, 3), p, atol=0.045)


def test_banned_token_never_sampled():
    torch.manual_seed(11)
    n = 5000
    logits = probs_logits([0.5, 0.5, 1e-9], n)
    logits[:, 2] = -math.inf
    out = sample([make_seq(seed=i % 3 if i < 30 else None) for i in range(n)], logits)
    assert 2 not in out.sampled_token_ids


def _reference_top_k_top_p(logits, top_k, top_p):
    """Row by row with a full sort: keep top-k, renormalise, keep while the mass above is < top_p."""
    out = logits.clone()
    for row, k, p in zip(out, top_k, top_p):
        order = row.argsort(descending=True)
        k = k or row.numel()
        probs = torch.zeros_like(row)
        probs[order[:k]] = row[order[:k]].softmax(-1)
        mass = 0.0
        for rank, tok in enumerate(order.tolist()):
            if rank >= k or (p < 1.0 and mass >= p):
                row[tok] = -math.inf
            mass += probs[tok].item()
    return out


SMALL_K = [(0, 0.5), (0, 0.9), (5, 0.9), (40, 1.0), (0, 1.0), (0, 0.95)]
BIG_K = SMALL_K + [(2000, 0.95), (1500, 0.3), (0, 0.99)]


@pytest.mark.parametrize("scale, configs, widths", [
    (8.0, SMALL_K, [128]),                   # small nuclei: decided from each row's top 128
    (8.0, BIG_K, [128, 2048]),               # top-k beyond 128: those rows need the top 2048
    (0.05, BIG_K, [128, 2048, 3000]),        # huge nuclei: full sort
    (None, BIG_K, [128, 2048, 3000]),        # a mix
    (0.05, [(50, 0.9), (5, 0.5), (200, 0.99), (7, 1.0)], [200]),   # top-k on every row: one top-max_k pass
])
def test_top_k_top_p_matches_full_sort_reference(scale, configs, widths, monkeypatch):
    from lmserve.engine import sampler as sampler_mod
    seen = []
    real = sampler_mod._nucleus_threshold
    monkeypatch.setattr(sampler_mod, "_nucleus_threshold",
                        lambda logits, k, p, width, full: seen.append(width) or real(logits, k, p, width, full))
    torch.manual_seed(12)
    vocab = 3000
    scales = torch.tensor([scale or (8.0 if i % 2 else 0.05) for i in range(len(configs))]).unsqueeze(1)
    logits = torch.randn(len(configs), vocab) * scales
    seqs = [make_seq(top_k=k, top_p=p) for k, p in configs]
    md = SamplingMetadata.from_sequences(seqs, vocab, CPU)
    got = logits.clone()
    sampler_mod._apply_top_k_top_p(got, md)
    expected = _reference_top_k_top_p(logits, [k for k, _ in configs], [p for _, p in configs])
    assert torch.equal(got.isinf(), expected.isinf())
    assert seen == widths


@pytest.mark.parametrize("vocab", [262144, 49152, 32064, 4096])
def test_argmax_equals_torch_with_ties_nan_and_inf(vocab):
    """The sampler's run-wise argmax (vectorized amax, then one run) returns torch.argmax's indices: the first
    maximum on ties, NaN as the maximum, all -inf rows; vocabularies that are not whole runs fall back."""
    from lmserve.engine.sampler import argmax
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g)
    x[1, 7] = x[1, vocab - 3] = x[1].max() + 1          # a tie: the first wins
    x[2, 300] = x[2, 299] = 50.0                         # a tie inside one run
    x[3, vocab // 2] = float("nan")
    x[3, 5] = float("inf")
    x[4] = float("-inf")
    x[5, vocab - 1] = 1e9                                # the last value
    assert torch.equal(argmax(x), x.argmax(dim=-1))
    for rows in (1, 16):
        y = torch.randn(rows, vocab, generator=g)
        assert torch.equal(argmax(y), y.argmax(dim=-1))
