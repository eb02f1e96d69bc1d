"""Sampler: batched logits processing and sampling, driven by per-row SamplingMetadata.

Order (as vLLM): grammar bitmask (guided rows only, engine/guided.py) -> penalties -> logit_bias -> min_tokens ->
greedy rows take the argmax; sampled rows go on through temperature -> top-k -> top-p -> min-p -> sample. Reported logprobs come from the RAW logits
(log_softmax before any processing), so they can be checked against a reference model.

Every stage is skipped when no row in the batch needs it, and each stage is one batched tensor op; the only
per-row Python work is building the metadata and drawing noise for seeded rows.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from lmserve.engine.guided import GuidedState, apply_bitmask
from lmserve.engine.sequence import Sequence
from lmserve.outputs import TokenLogprob

# top-p looks at this many of the largest logits of each row before it sorts the whole row
_TOP_P_WIDTHS = (128, 2048)


@dataclass
class SamplingMetadata:
    """Per-step sampling settings of the rows in a logits batch. A None tensor means no row needs that stage."""
    num_seqs: int
    vocab_size: int
    # rows that sample (not greedy), ascending; None when every row samples
    random_rows: torch.Tensor | None = None                 # [num_random] long
    num_random: int = 0
    # --- sampling stages, indexed by position among the random rows ---
    temperature: torch.Tensor | None = None                 # [num_random, 1]; None when all are 1.0
    top_k: torch.Tensor | None = None                       # [num_random] long; 0 = off for that row
    max_top_k: int = 0
    top_k_on_all_rows: bool = False
    top_p: torch.Tensor | None = None                       # [num_random]; 1.0 = off for that row
    log_min_p: torch.Tensor | None = None                   # [num_random, 1]; log(min_p), -inf = off
    generators: dict[int, torch.Generator] = field(default_factory=dict)   # random-row position -> generator
    # --- penalties: sparse, over the flattened logits (index = row * vocab + token, one per occurrence) ---
    num_penalized: int = 0
    repetition: tuple[torch.Tensor, torch.Tensor] | None = None   # (index, penalty) over prompt + output tokens
    output_index: torch.Tensor | None = None                      # [num_output_occurrences]
    frequency_penalty: torch.Tensor | None = None                 # [num_output_occurrences]
    presence_penalty: torch.Tensor | None = None                  # [num_output_occurrences]
    # --- sparse edits over the whole batch: (row ids, token ids[, values]) ---
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None      # set to -inf this step
    # --- guided decoding: (row, grammar state) of the constrained rows; None when no row is constrained ---
    guided: list[tuple[int, GuidedState]] | None = None
    # --- logprobs ---
    num_logprobs: list[int | None] = field(default_factory=list)          # per row; None = not requested
    logprob_rows: torch.Tensor | None = None                # [num_lp] long; None when all rows (or none)
    max_num_logprobs: int | None = None                     # None = no row wants logprobs

    @property
    def all_greedy(self) -> bool:
        return self.num_random == 0

    @property
    def all_random(self) -> bool:
        return self.num_random == self.num_seqs

    @property
    def no_penalties(self) -> bool:
        return self.num_penalized == 0

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingMetadata:
        n = len(seqs)
        random_rows: list[int] = []
        temps, top_ks, top_ps, min_ps = [], [], [], []
        generators: dict[int, torch.Generator] = {}
        pen_rows: list[int] = []
        rep, pres, freq = [], [], []
        bias_rows, bias_ids, bias_vals = [], [], []
        ban_rows, ban_ids = [], []
        num_logprobs: list[int | None] = []
        lp_rows: list[int] = []
        guided: list[tuple[int, GuidedState]] = []
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.guided is not None:
                guided.append((i, seq.guided))
            if not p.is_greedy:
                if seq.generator is not None:
                    generators[len(random_rows)] = seq.generator
                random_rows.append(i)
                temps.append(p.temperature)
                top_ks.append(min(p.top_k, vocab_size))
                top_ps.append(p.top_p)
                min_ps.append(p.min_p)
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                pen_rows.append(i)
                rep.append(p.repetition_penalty)
                pres.append(p.presence_penalty)
                freq.append(p.frequency_penalty)
            if p.logit_bias:
                for tok, b in p.logit_bias.items():
                    bias_rows.append(i)
                    bias_ids.append(int(tok))
                    bias_vals.append(float(b))
            if seq.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids)
                if not p.ignore_eos:
                    banned.update(seq.eos_token_ids)
                ban_rows.extend([i] * len(banned))
                ban_ids.extend(banned)
            num_logprobs.append(p.logprobs)
            if p.logprobs is not None:
                lp_rows.append(i)

        def t(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        md = cls(num_seqs=n, vocab_size=vocab_size, num_random=len(random_rows), generators=generators,
                 num_logprobs=num_logprobs, guided=guided or None)
        if random_rows:
            if len(random_rows) < n:
                md.random_rows = t(random_rows, torch.long)
            if any(x != 1.0 for x in temps):
                md.temperature = t(temps).unsqueeze(1)
            if any(top_ks):
                md.top_k, md.max_top_k = t(top_ks, torch.long), max(top_ks)
                md.top_k_on_all_rows = all(top_ks)
            if any(x < 1.0 for x in top_ps):
                md.top_p = t(top_ps)
            if any(min_ps):
                md.log_min_p = t(min_ps).log().unsqueeze(1)
        if pen_rows:
            md._build_penalties(seqs, pen_rows, rep, pres, freq, device)
        if bias_rows:
            md.logit_bias = (t(bias_rows, torch.long), t(bias_ids, torch.long), t(bias_vals))
        if ban_rows:
            md.min_tokens_mask = (t(ban_rows, torch.long), t(ban_ids, torch.long))
        if lp_rows:
            md.max_num_logprobs = max(num_logprobs[i] for i in lp_rows)
            if len(lp_rows) < n:
                md.logprob_rows = t(lp_rows, torch.long)
        return md

    def _build_penalties(self, seqs: list[Sequence], rows: list[int], rep: list[float], pres: list[float],
                         freq: list[float], device: torch.device) -> None:
        # NOTE: O(prompt + output length) per penalized row per step (as vLLM v0), but never O(vocab): the
        # penalties touch only the tokens a row has seen. Only rows that asked for a penalty pay.
        self.num_penalized = len(rows)
        vocab = self.vocab_size
        if any(x != 1.0 for x in rep):
            index, lengths = _flat_index([seqs[i].token_ids for i in rows], rows, vocab, device)
            self.repetition = (index, _per_occurrence(rep, lengths))
        if any(pres) or any(freq):
            output_ids = [seqs[i].output_token_ids for i in rows]
            if any(output_ids):
                self.output_index, lengths = _flat_index(output_ids, rows, vocab, device)
                if any(freq):
                    self.frequency_penalty = _per_occurrence(freq, lengths)
                if any(pres):
                    self.presence_penalty = _per_occurrence(pres, lengths)


def _flat_index(token_lists: list[list[int]], rows: list[int], vocab: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """row * vocab + token for every token of every row's list (repeats kept), and the lists' lengths."""
    num_tokens = [len(x) for x in token_lists]
    lengths = torch.tensor(num_tokens, device=device)
    # NOTE: numpy builds a tensor from a long int list ~6x faster than torch.tensor(list)
    tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=sum(num_tokens))
    row_offsets = torch.tensor(rows, device=device) * vocab
    return torch.from_numpy(tokens).to(device) + torch.repeat_interleave(row_offsets, lengths), lengths


def _per_occurrence(values: list[float], lengths: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.tensor(values, device=lengths.device), lengths)


@dataclass
class SamplerOutput:
    sampled_token_ids: list[int]                 # one per row
    logprobs: list[TokenLogprob | None] | None   # one per row when any row asked; None entries for the others


class Sampler:
    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """logits: [num_seqs, vocab]. NOTE: modified in place; pass a tensor the caller no longer needs."""
        md = metadata
        if logits.dtype != torch.float32 or not logits.is_contiguous():
            logits = logits.float().contiguous()
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            # computed before any processing: a new tensor, so the in-place edits below do not touch it
            lp_logits = logits if md.logprob_rows is None else logits[md.logprob_rows]
            raw_logprobs = torch.log_softmax(lp_logits, dim=-1)              # [num_lp, vocab]

        apply_logits_processors(logits, md)
        if md.all_random:
            sampled = _sample(logits, md)                                      # [num_seqs]
        else:
            sampled = argmax(logits)                                           # [num_seqs]
            if not md.all_greedy:
                sampled[md.random_rows] = _sample(logits[md.random_rows], md)

        logprobs = None
        if raw_logprobs is not None:
            chosen = sampled if md.logprob_rows is None else sampled[md.logprob_rows]
            entries = iter(_to_token_logprobs(raw_logprobs, chosen, md.max_num_logprobs))
            logprobs = []
            for k in md.num_logprobs:
                if k is None:
                    logprobs.append(None)
                else:
                    lp = next(entries)
                    del lp.top[k:]
                    logprobs.append(lp)
        return SamplerOutput(sampled.tolist(), logprobs)


def argmax(logits: torch.Tensor, width: int = 128) -> torch.Tensor:
    """logits.argmax(dim=-1) of a [rows, vocab] tensor, the same indices (the first maximum; NaN counts as the
    maximum, as in torch). torch's CPU argmax is a scalar loop (0.4 ms for one 262k-wide row, 3.3 ms for 16);
    amax is vectorized: the maximum of each run of `width` values, the first run holding the row's maximum, then
    the argmax inside it (~0.04 ms and ~0.3 ms)."""
    rows, vocab = logits.shape
    if vocab % width or vocab < 32 * width:
        return logits.argmax(dim=-1)
    runs = logits.view(rows, vocab // width, width)
    run = runs.amax(dim=-1).argmax(dim=-1)                                     # [rows]
    return run * width + runs[torch.arange(rows, device=logits.device), run].argmax(dim=-1)


def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Grammar mask -> penalties -> logit_bias -> min_tokens, in place: what every row goes through before the
    greedy argmax or the sampling distribution. The sampler and the speculative verifier both call this."""
    if md.guided is not None:
        apply_bitmask(logits, md.guided)
    if not md.no_penalties:
        apply_penalties(logits, md)
    if md.logit_bias is not None:
        rows, ids, vals = md.logit_bias
        logits.index_put_((rows, ids), vals, accumulate=True)
    if md.min_tokens_mask is not None:
        logits[md.min_tokens_mask] = float("-inf")


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Repetition (HF-style, prompt + output tokens), then frequency and presence (OpenAI-style, output only).
    NOTE: indices repeat (one per occurrence). Frequency accumulates over repeats; repetition and presence
    gather-modify-scatter, where every repeat writes the same value, so they apply once per token."""
    flat = logits.view(-1)                                                     # [num_seqs * vocab]
    if md.repetition is not None:
        index, penalty = md.repetition
        x = flat[index]
        flat[index] = torch.where(x > 0, x / penalty, x * penalty)
    if md.frequency_penalty is not None:
        flat.index_add_(0, md.output_index, md.frequency_penalty, alpha=-1)
    if md.presence_penalty is not None:
        flat[md.output_index] = flat[md.output_index] - md.presence_penalty


def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """logits: [num_random, vocab] of the sampled rows (modified in place) -> token ids [num_random]."""
    return _random_sample(processed_probs(logits, md), md.generators)


def processed_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """The distribution sampled from: temperature -> top-k/top-p -> min-p -> softmax (in place on logits).
    Speculative decoding verifies drafts against exactly this distribution."""
    if md.temperature is not None:
        logits.div_(md.temperature)
    if md.top_p is not None:
        _apply_top_k_top_p(logits, md)
    elif md.top_k is not None:
        _apply_top_k(logits, md.top_k, md.max_top_k)
    if md.log_min_p is not None:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
        logits.masked_fill_(logits < logits.max(dim=-1, keepdim=True).values + md.log_min_p, float("-inf"))
    return logits.softmax(dim=-1)


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    top = logits.topk(max_top_k, dim=-1).values                                # [n, max_top_k]
    thresh = top.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))              # [n, 1]
    thresh.masked_fill_((top_k == 0).unsqueeze(1), float("-inf"))
    logits.masked_fill_(logits < thresh, float("-inf"))


def _apply_top_k_top_p(logits: torch.Tensor, md: SamplingMetadata) -> None:
    n, vocab = logits.shape
    k = md.top_k                                                               # [n]; vocab = off
    k = torch.full((n,), vocab, device=logits.device) if k is None else torch.where(k == 0, vocab, k)
    top_p = md.top_p
    # NOTE: a full sort of [n, vocab] is the slowest op in the sampler (~60x a top-128 on CPU). Nuclei are
    # usually small, so each row is first cut from its top 128 logits, and only rows whose cut-off lies beyond
    # go on to a wider view, then to the full sort.
    if md.top_k_on_all_rows:
        widths = [md.max_top_k]             # every row's top-k tokens are in view: decided in one pass
    else:
        widths = [w for w in _TOP_P_WIDTHS if w < vocab] + [vocab]
    thresh = torch.empty(n, 1, device=logits.device)
    rows = None                                                                # None = all rows
    for width in widths:
        if rows is None:
            cut, decided = _nucleus_threshold(logits, k, top_p, width, not md.top_k_on_all_rows)
            rows = torch.arange(n, device=logits.device)
        else:
            cut, decided = _nucleus_threshold(logits[rows], k[rows], top_p[rows], width, True)
        thresh[rows[decided]] = cut[decided]
        rows = rows[~decided]
        if rows.numel() == 0:
            break
    logits.masked_fill_(logits < thresh, float("-inf"))


def _nucleus_threshold(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, width: int,
                       full_log_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The [n, 1] logit cut-off of top-k then top-p, from the `width` largest logits of each row, and [n]
    whether it could be decided from them. Both filters keep a prefix of the sorted row."""
    vocab = logits.shape[-1]
    if width < vocab:
        vals = logits.topk(width, dim=-1).values                               # [n, width], descending
    else:
        vals = logits.sort(dim=-1, descending=True).values                    # [n, vocab]
    positions = torch.arange(width, device=logits.device)
    vals.masked_fill_(positions >= k.unsqueeze(1), float("-inf"))              # top-k
    # top-p is on the probabilities after top-k: the normaliser is over the top-k tokens, which are all in
    # view when k <= width; rows with top-k off need the whole row's
    log_z = vals.logsumexp(dim=-1)                                             # [n]
    if full_log_z and width < vocab:
        log_z = torch.where(k >= vocab, logits.logsumexp(dim=-1), log_z)
    probs = (vals - log_z.unsqueeze(1)).exp_()
    # keep a token while the mass strictly above it is < top_p, so the best token always stays
    mass_above = probs.cumsum(dim=-1).sub_(probs)
    num_kept = (mass_above < top_p.unsqueeze(1)).sum(dim=-1)                   # [n]
    # NOTE: at least one token: a top_p that is 0 in float32 (or NaN probabilities) would otherwise gather
    # index -1 and take the engine down (issue 25); validation rejects such top_p, this is the second guard
    num_kept = torch.minimum(torch.where(top_p >= 1.0, vocab, num_kept), k).clamp_(min=1)
    # decided: the normaliser is right, and the cut falls inside the view (or nothing is cut)
    decided = ((k <= width) | (k >= vocab)) & ((num_kept < width) | (num_kept == k))
    thresh = vals.gather(1, (num_kept.clamp(max=width) - 1).unsqueeze(1))     # [n, 1]
    return thresh.masked_fill_((num_kept >= vocab).unsqueeze(1), float("-inf")), decided


def _random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform draw per row: the first token whose cumulative probability
    exceeds u * total. A seeded row draws its u from its own generator, so its token does not depend on the
    other rows. NOTE: one draw per row, not one per token as in the exponential race argmax(p / q), which
    is ~7x slower on CPU where the RNG dominates; the CDF is accumulated in float64 so that tokens below
    float32 resolution (~6e-8) keep their probability."""
    n = probs.shape[0]
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)                            # [n, vocab]
    total = cdf[:, -1:]                                                        # [n, 1]
    u = torch.empty(n, 1, dtype=torch.float64, device=probs.device)
    if len(generators) < n:
        u.uniform_()
    for i, gen in generators.items():
        u[i].uniform_(generator=gen)
    # u * total can round up to total: cap it just below, so a zero-probability tail is never picked
    target = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    # NOTE: the clamp only matters for NaN logits, which must not turn into an out-of-vocabulary id
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor | list[int], num_top: int) -> list[TokenLogprob]:
    """logits: [n, vocab] raw -> per row: token_ids[row]'s logprob and the top-num_top (token_id, logprob)."""
    if not isinstance(token_ids, torch.Tensor):
        token_ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    return _to_token_logprobs(torch.log_softmax(logits.float(), dim=-1), token_ids, num_top)


def _to_token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[TokenLogprob]:
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1).tolist()
    ids = token_ids.tolist()
    if num_top <= 0:
        return [TokenLogprob(t, lp) for t, lp in zip(ids, chosen)]
    top = logprobs.topk(num_top, dim=-1)
    return [TokenLogprob(t, lp, list(zip(top_ids, top_lps)))
            for t, lp, top_ids, top_lps in zip(ids, chosen, top.indices.tolist(), top.values.tolist())]
