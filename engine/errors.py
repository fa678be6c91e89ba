"""Errors the engine raises for bad input. Each subclasses EngineInputError (-> HTTP 400)."""


class EngineError(Exception):
    """Base of every engine error."""


class EngineInputError(EngineError, ValueError):
    """The request is invalid; the message names the problem and the fix. Maps to HTTP 400."""


class EmptyPromptError(EngineInputError):
    pass


class PromptTooLongError(EngineInputError):
    pass


class InvalidSamplingParams(EngineInputError):
    pass


class ModelLoadError(EngineError, ValueError):
    """Unknown preset, missing/invalid checkpoint files, unsupported architecture."""


class EngineStartError(EngineError, RuntimeError):
    """The engine could not compile or capture its kernels at start-up (the cause is chained)."""


class EngineClosedError(EngineError, RuntimeError):
    """The engine shut down before a queued request ran; nothing was generated, retry it elsewhere."""


class EngineBusyError(EngineError, RuntimeError):
    """Every KV slot is taken and the waiting queue is full: retry later or on another replica (HTTP 503)."""
