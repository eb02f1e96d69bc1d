"""Speculative decoding (n-gram prompt lookup): proposals, exact rejection sampling, engine equality with plain
decoding (greedy tokens, logprobs, stop strings, prefix caching, batching with other sequences)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.sequence import Sequence
from lmserve.engine.spec_decode import ngram_propose, verify
from lmserve.sampling_params import SamplingParams

# an "edit this text" workload: the answer repeats the input, so prompt lookup finds long drafts
PASSAGE = ("The library opens at nine in the morning and closes at six in the evening. Visitors may borrow up to "
           "five books at a time, and each loan lasts three weeks. Late returns cost ten cents a day.")
EDIT_PROMPT = (f"Rewrite this paragraph, changing 'nine' to 'eight' and keeping everything else the same.\n\n"
               f"{PASSAGE}\n\nRewritten paragraph:\n")


def test_ngram_propose_takes_latest_longest_match():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_propose(ids, 3, 4, 2) == [7, 8, 5]          # latest occurrence of [1, 2, 3]
    assert ngram_propose(ids, 10, 4, 2) == [7, 8, 5, 1, 2, 3]  # stops at the end of the sequence
    assert ngram_propose([4, 5, 6, 7], 3, 4, 2) == []         # no earlier occurrence
    assert ngram_propose([5, 6, 0, 6], 2, 3, 1) == [0, 6]     # down to a 1-gram
    assert ngram_propose([5, 6, 0, 6], 2, 3, 2) == []


def _seq(**params) -> Sequence:
    return Sequence(0, "r", [1, 2, 3], SamplingParams(**params))


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)])
def test_rejection_sampling_keeps_the_distribution(params):
    """Each emitted position must follow the target distribution given the tokens before it, whatever the draft:
    chi-square goodness of fit on the first token, and on the second token when the first was the draft's."""
    torch.manual_seed(0)
    vocab = 6
    logits = torch.randn(3, vocab) * 1.5                                 # rows for [last, d1, d2]
    draft = [int(logits[0].argmax()), int(logits[1].argsort()[-2])]     # a likely and a less likely draft
    seq = _seq(**params)
    from lmserve.engine.sampler import SamplingMetadata, processed_probs
    md = SamplingMetadata.from_sequences([seq] * 3, vocab, torch.device("cpu"))
    want = processed_probs(logits.clone(), md).double().numpy()         # [3, vocab]
    n = 3000
    first = np.zeros(vocab)
    second = np.zeros(vocab)
    lengths = []
    for _ in range(n):
        r = verify(logits, draft, seq)
        lengths.append(len(r.token_ids))
        first[r.token_ids[0]] += 1
        if r.token_ids[0] == draft[0]:
            second[r.token_ids[1]] += 1
    for counts, p in ((first, want[0]), (second, want[1])):
        keep = p > 0
        assert counts[~keep].sum() == 0                                   # never a token the target excludes
        if keep.sum() > 1:
            expected = p[keep] / p[keep].sum() * counts.sum()
            assert stats.chisquare(counts[keep], expected).pvalue > 1e-4
    # reject-first and (where the target allows the second draft) accept-all both happened
    assert min(lengths) == 1 and max(lengths) == (3 if want[1][draft[1]] > 0 else 2)


def test_greedy_verify_accepts_the_argmax_prefix():
    logits = torch.zeros(4, 5)
    logits[0, 2] = logits[1, 3] = logits[2, 1] = logits[3, 4] = 5.0
    seq = _seq(temperature=0.0, logprobs=2)
    r = verify(logits, [2, 3, 0], seq)
    assert r.token_ids == [2, 3, 1] and r.num_accepted == 2
    assert [lp.token_id for lp in r.logprobs] == [2, 3, 1] and len(r.logprobs[0].top) == 2
    assert verify(logits, [2, 3, 1], seq).token_ids == [2, 3, 1, 4]   # all accepted: one bonus token


def _engine(spec: bool, **spec_kw) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(dtype="float32"),   # exact mode: spec on and off must agree token for token
        cache=CacheConfig(num_blocks=512),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256),
        speculative=SpeculativeConfig(method="ngram", **spec_kw) if spec else SpeculativeConfig()))


@pytest.fixture(scope="module")
def engines():
    return _engine(False), _engine(True)


def _chat(engine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_greedy_equals_plain_decoding(engines):
    """Greedy with speculation == greedy without, token for token and logprob for logprob, batched with
    sequences that do not speculate (sampled with a seed) in the same steps."""
    plain, spec = engines
    prompts = [_chat(plain, EDIT_PROMPT), _chat(plain, "Repeat exactly: " + PASSAGE), list(range(100, 140)) * 2]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=48, ignore_eos=True)
    want = plain.generate(prompts + [prompts[0]], [params] * 3 + [seeded])
    got = spec.generate(prompts + [prompts[0]], [params] * 3 + [seeded])
    for a, b in zip(want, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
    for a, b in zip(want[:3], got[:3]):
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-3
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    s = spec.get_stats()
    assert s.spec_num_accepted_tokens > 20, s                      # it did speculate, and it paid
    assert s.spec_num_emitted_tokens / s.spec_num_verify_steps > 1.5
    assert s.num_generation_tokens_total == sum(len(o.outputs[0].token_ids) for o in got)


def test_stop_strings_and_prefix_cache(engines):
    """A stop string inside an accepted run ends the output at the same place; a second run of the same prompt
    (prefix-cache hit, blocks first filled by speculative steps) gives the same tokens."""
    plain, spec = engines
    prompt = _chat(plain, "Repeat exactly: " + PASSAGE)
    params = SamplingParams(temperature=0.0, max_tokens=64, stop=["each loan"], include_stop_str_in_output=False)
    want = plain.generate([prompt], params)[0].outputs[0]
    first = spec.generate([prompt], params)[0]
    again = spec.generate([prompt], params)[0]
    assert first.outputs[0].text == want.text and first.outputs[0].token_ids == want.token_ids
    assert want.finish_reason == first.outputs[0].finish_reason
    assert again.outputs[0].token_ids == want.token_ids and again.num_cached_tokens > 0


def test_auto_off_under_load():
    """More decoding sequences than disable_by_batch_size: no proposals, same tokens."""
    engine = _engine(True, disable_by_batch_size=2)
    prompts = [list(range(100, 120)) * 2] * 3
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    # NOTE: the repeating prompts would draft (test above) were the batch small
    stats = engine.get_stats()
    assert stats.spec_num_draft_tokens == 0 and stats.spec_num_verify_steps == 0
    assert len({tuple(o.outputs[0].token_ids) for o in out}) == 1


def test_draft_model_path_is_a_clear_error():
    with pytest.raises(ValueError, match="not implemented"):
        LLMEngine(EngineConfig(model=ModelConfig(dtype="float32"),
                               speculative=SpeculativeConfig(method="draft", model="/nonexistent")))


def test_metrics_and_greedy_over_http(tmp_path, tiny_models):
    """A server with --speculative-method ngram: the same greedy text as the offline engine without speculation,
    and the acceptance counters in /metrics."""
    import httpx
    import openai

    from tests.conftest import API_SERVER_ARGS, start_api_server
    prompt = "one two three four one two three four one two three four one two"
    want = LLMEngine(EngineConfig(model=ModelConfig(model=tiny_models["llama"], dtype="float32"))).generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    server = start_api_server(tmp_path, tiny_models["llama"], "--speculative-method", "ngram", *API_SERVER_ARGS)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == want
        metrics = httpx.get(f"{server.url}/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("lmserve:spec_decode")}
        assert values["lmserve:spec_decode_num_draft_tokens_total"] > 0
        assert "lmserve:spec_decode_draft_acceptance_rate" in values
        assert values["lmserve:spec_decode_tokens_per_step"] >= 1.0
    finally:
        server.stop()


def test_draft_length_adapts_to_acceptance():
    """A rejection shrinks the next draft to one more than was accepted; a fully accepted one doubles it, up to
    num_speculative_tokens; a draft cut short by the match's end says nothing against longer ones."""
    from lmserve.engine.spec_decode import SpecDecoder, VerifyResult
    spec = SpecDecoder(SpeculativeConfig(method="ngram", num_speculative_tokens=6), block_manager=None,
                       max_num_batched_tokens=256)
    seq = _seq(temperature=0.0)
    ks = []
    for num_draft, accepted in ((6, 0), (1, 1), (2, 2), (4, 1), (2, 2), (4, 4), (6, 6), (2, 2)):
        spec.record(seq, num_draft, VerifyResult([0] * (accepted + 1), None, accepted))
        ks.append(seq.spec_k)
    assert ks == [1, 2, 4, 2, 4, 6, 6, 6]
    assert spec.num_draft_tokens == 27 and spec.num_accepted_tokens == 18 and spec.num_verify_steps == 8
