"""lmserve: serve LLMs behind an OpenAI-compatible REST API."""
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
