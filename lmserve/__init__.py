"""lmserve: serve LLMs behind an OpenAI-compatible REST API."""
import os as _os

# NOTE: PyTorch's CPU allocator asks Linux for transparent huge pages (MADV_HUGEPAGE, 2 MB) for buffers of >= 2 MB
# when THP_MEM_ALLOC_ENABLE is set: the repacked weights then take a TLB entry per 2 MB instead of per 4 KB, and a
# prefill's outputs a page fault per 2 MB. Measured on a Sapphire Rapids VM (THP in madvise mode, Linux's usual
# default): a 1B Q4_K_M decode step 8-10% faster, its 512-token prefill 3-6%, RSS unchanged (docs/benchmarks.md).
# A default: the user's own THP_MEM_ALLOC_ENABLE (0 turns it off) wins; where THP is "never" it changes nothing.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig
from lmserve.outputs import CompletionOutput, FinishReason, RequestOutput
from lmserve.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["CacheConfig", "EngineConfig", "ModelConfig", "SchedulerConfig", "ServerConfig", "CompletionOutput",
           "FinishReason", "RequestOutput", "SamplingParams", "pipeline", "Pipeline", "LLM", "GenerationConfig",
           "LLMEngine", "AsyncEngine"]


def __getattr__(name):
    # Lazy so `import lmserve` (e.g. for the protocol or the proxy) does not pull in the engine and torch models.
    if name in ("pipeline", "Pipeline", "LLM"):
        from lmserve import offline
        return getattr(offline, name)
    if name == "GenerationConfig":
        from lmserve.generation_config import GenerationConfig
        return GenerationConfig
    if name == "LLMEngine":
        from lmserve.engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "AsyncEngine":
        from lmserve.engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)
