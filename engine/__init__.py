"""hybridserve engine: a LLaMA-family engine with CUDA-graph replay and a JIT fallback. No Ray here."""
from .api import GenerationResult, Logprob, RequestMetrics, SamplingParams, StreamChunk, TokenLogprobs
from .config import EngineConfig
from .engine import HybridEngine
from .errors import (EmptyPromptError, EngineClosedError, EngineError, EngineInputError, EngineStartError,
                     InvalidSamplingParams, ModelLoadError, PromptTooLongError, EngineBusyError)

__version__ = "0.1.0"

__all__ = ["HybridEngine", "SamplingParams", "EngineConfig", "GenerationResult", "RequestMetrics",
           "StreamChunk", "Logprob", "TokenLogprobs", "EngineError", "EngineClosedError", "EngineInputError",
           "EmptyPromptError", "PromptTooLongError", "EngineStartError",
           "InvalidSamplingParams", "ModelLoadError", "EngineBusyError", "__version__"]
