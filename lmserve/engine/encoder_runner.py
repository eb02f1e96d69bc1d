"""EncoderRunner: the ModelRunner of an encoder (BERT family) serving embeddings.

Attention is bidirectional, so the scheduler gives each sequence its whole prompt in one step
(`Sequence.needs_whole_prompt`); the runner packs the step's sequences, runs the encoder once, and pools and
normalises each one as the checkpoint declares (model/pooling.py). There is no KV cache: the block manager still
counts blocks (sized so that max_num_seqs full-length sequences always fit), but none hold tensors.
"""
from __future__ import annotations

import logging

import torch

from lmserve.config import CacheConfig, ModelConfig
from lmserve.engine.model_runner import RunnerOutput
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.model.bert import EncoderConfig, load_encoder_config, load_encoder_weights
from lmserve.model.classifier import is_cross_encoder, load_classifier, pair_token_types
from lmserve.model.pooling import PoolingConfig, load_pooling_config, pool
from lmserve.model.registry import get_encoder_class
from lmserve.startup import phase

logger = logging.getLogger(__name__)


class EncoderRunner:
    is_encoder = True

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, model_path: str,
                 max_num_seqs: int, max_model_len: int | None = None):
        self.model_config = model_config
        self.model_path = model_path
        self.device = model_config.torch_device
        if model_config.num_threads:
            torch.set_num_threads(model_config.num_threads)
        self.dtype = model_config.torch_dtype
        self.arch: EncoderConfig = load_encoder_config(model_path)
        self.pooling: PoolingConfig = load_pooling_config(model_path)
        # NOTE: sentence-transformers truncates at max_seq_length; we refuse longer inputs instead (a 400), so the
        # vectors we return are always of the whole text
        limit = min(self.arch.max_len, self.pooling.max_seq_length or self.arch.max_len)
        self.max_model_len = min(max_model_len or limit, limit)
        self.block_size = cache_config.block_size
        self.num_blocks = max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        self.kv_caches: list = []
        self.model = None
        self.head = None       # a cross-encoder's classifier: execute() then gives scores, not vectors
        self.sep_token_id: int | None = None    # set by the engine for a BERT cross-encoder (segment ids)
        with phase(logger, "loading weights") as done:
            self.reload_model()
            num_params = sum(p.numel() for p in self.model.parameters())
            done["done"] = f"{num_params / 1e6:.0f}M parameters, {self.dtype} on {self.device}"
        logger.info("encoder %s: %s pooling%s, inputs up to %d tokens", self.arch.architecture, self.pooling.mode,
                    ", normalised" if self.pooling.normalize else "", self.max_model_len)

    # ---- set-up ---------------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        cls = get_encoder_class(self.arch.architecture)
        with torch.device(self.device):
            model = cls(self.arch).to(self.dtype)
        return model.eval().requires_grad_(False)

    def reload_model(self) -> None:
        self.model = self._build_model()
        weights = load_encoder_weights(self.model_path, self.dtype)
        self.model.load_weights(weights, strict=True)
        if is_cross_encoder(self.model_path):
            self.head = load_classifier(weights, self.arch.hidden_size, self.arch.position_offset > 0, self.dtype,
                                        self.device)
        self._attach_fast()

    def _attach_fast(self) -> None:
        if self.dtype == torch.float32:
            fast = torch.bfloat16 if self.model_config.matmul_precision == "bfloat16" else torch.float32
            self.model.attach_fast(fast)

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_weights(weights)   # all-or-nothing
        self.model.detach_fast()           # the packed copies are stale now
        self._attach_fast()

    def allocate_kv_cache(self) -> None:
        pass   # no KV cache

    def free_kv_cache(self) -> None:
        pass

    # ---- one step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        seqs = [s.seq for s in sched.scheduled]
        for s in sched.scheduled:
            if not s.seq.pooling or s.seq.num_computed_tokens != 0 or s.num_new_tokens != s.seq.num_tokens:
                raise RuntimeError("an encoder computes whole sequences for pooling requests only")
        input_ids = [t for seq in seqs for t in seq.token_ids]
        positions = [p for seq in seqs for p in range(seq.num_tokens)]
        seq_lens = [seq.num_tokens for seq in seqs]
        dev = self.device
        ids = torch.tensor(input_ids, device=dev)
        types = None
        if self.head is not None and self.sep_token_id is not None and self.arch.type_vocab_size > 1:
            types = pair_token_types(ids, seq_lens, self.sep_token_id)
        hidden = self.model(ids, torch.tensor(positions, device=dev), seq_lens, types)
        if self.head is not None:      # scores of (query, document) pairs from the CLS rows
            starts = torch.tensor(seq_lens, device=dev).cumsum(0) - torch.tensor(seq_lens, device=dev)
            scores = self.head(hidden[starts])                              # [num_seqs, num_labels] float32
            return RunnerOutput(pooled={seq.seq_id: scores[i] for i, seq in enumerate(seqs)})
        vectors = pool(hidden, seq_lens, self.pooling)                     # [num_seqs, hidden] float32
        return RunnerOutput(pooled={seq.seq_id: vectors[i] for i, seq in enumerate(seqs)})

    def pooled_embedding(self, pooled: torch.Tensor, num_tokens: int) -> list[float]:
        """The step's pooled vector is final (whole sequences, pooled and normalised in execute)."""
        return pooled.tolist()
