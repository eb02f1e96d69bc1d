"""Offline inference in the spirit of LMDeploy's `pipeline(model)(prompts, gen_config)`.

    from lmserve import pipeline, GenerationConfig     # GenerationConfig: lmserve/generation_config.py
    pipe = pipeline()                                  # bundled SmolLM2
    print(pipe(["Hi, pls intro yourself", "Shanghai is"], GenerationConfig(max_new_tokens=32))[0].text)

A string prompt is a user message rendered with the chat template (as LMDeploy does); a list of
{"role", "content"} dicts is a whole conversation; a list of ints is used as token ids unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.generation_config import GenerationConfig
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams


@dataclass
class Response:
    """LMDeploy's Response shape."""
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None
    token_ids: list[int]
    logprobs: list | None = None
    index: int = 0


class Pipeline:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def close(self) -> None:
        """Stop tensor-parallel workers (also done at interpreter exit)."""
        self.engine.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt)
        return list(prompt)

    def __call__(self, prompts, gen_config: GenerationConfig | list[GenerationConfig] | None = None):
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], (dict, int)))
        batch = [prompts] if single else list(prompts)
        if isinstance(gen_config, list):
            params = [g.to_sampling_params() for g in gen_config]
        else:
            params = (gen_config or GenerationConfig()).to_sampling_params()
        outputs = self.engine.generate([self._prompt_ids(p) for p in batch], params)
        responses = [_response(o) for o in outputs]
        return responses[0] if single else responses

    def generate(self, prompts, params: SamplingParams | None = None, images: list | None = None
                 ) -> list[RequestOutput]:
        """images (vision-language models): PIL images per prompt, each written as its placeholder in the prompt."""
        return self.engine.generate(prompts, params, images=images)


def _response(out: RequestOutput) -> Response:
    c = out.outputs[0]
    return Response(text=c.text, generate_token_len=len(c.token_ids), input_token_len=len(out.prompt_token_ids),
                    finish_reason=c.finish_reason.value if c.finish_reason else None, token_ids=c.token_ids,
                    logprobs=c.logprobs, index=c.index)


def pipeline(model_path: str | None = None, *, session_len: int | None = None, dtype: str = "auto",
             device: str = "auto", cache_max_entry_count: float | None = None, cache_block_count: int | None = None,
             max_batch_size: int = 256, enable_prefix_caching: bool = True, chat_template: str | None = None,
             tp: int = 1, config: EngineConfig | None = None) -> Pipeline:
    """Build an offline pipeline. `config` overrides every other keyword.

    tp > 1 spawns tp - 1 worker processes (multiprocessing "spawn"): call it under `if __name__ == "__main__":`
    in a script, and `pipe.close()` (or exit) to stop them."""
    if config is None:
        config = EngineConfig(
            model=ModelConfig(model=model_path, dtype=dtype, device=device, chat_template=chat_template,
                              max_model_len=session_len),
            cache=CacheConfig(cache_max_entry_count=cache_max_entry_count, num_blocks=cache_block_count,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_batch_size), tp=tp)
    return Pipeline(LLMEngine(config))


LLM = Pipeline
