"""The Python-handle API of the app (``serve.get_app_handle("hybridserve").remote(...)``): the same
validation and replicas as HTTP, answers as plain dicts, bad input raised as EngineInputError."""
from __future__ import annotations

from typing import Any, AsyncIterator

from pydantic import ValidationError

from engine.errors import EngineInputError

from . import openai as oa
from .errors import APIError, validation_message
from .schemas import ChatCompletionRequest, Common, CompletionRequest


def _raise(e: APIError):
    if e.status < 500:
        raise EngineInputError(e.message) from None
    raise RuntimeError(e.message) from None


class HandleAPI:
    """Mixin of the ingress: needs ``prepare``, ``client``, ``text_and_logprobs``, ``model_name``."""

    def python_request(self, request: Any, overrides: dict) -> Common:
        if isinstance(request, (str, list)):
            body: dict = {"prompt": request}
        elif isinstance(request, dict):
            body = dict(request)
        else:
            raise EngineInputError("call with a prompt string, a list of token ids, or an OpenAI "
                                   "completions/chat request dict")
        body.update(overrides)
        model = ChatCompletionRequest if "messages" in body else CompletionRequest
        try:
            req = model.model_validate(body)
        except ValidationError as e:
            raise EngineInputError(validation_message(list(e.errors()))[0]) from None
        if req.n > 1 or (getattr(req, "best_of", None) or 1) > 1:
            raise EngineInputError("n and best_of above 1 are served over HTTP; from Python, call "
                                   "handle.remote(...) once per choice (with different seeds)")
        if isinstance(req, CompletionRequest) and req.is_batch and len(req.prompt) > 1:
            raise EngineInputError("a batch of prompts is served over HTTP; from Python, call "
                                   "handle.remote(...) once per prompt")
        return req

    async def complete(self, request: Any, **overrides: Any) -> dict:
        """Non-streaming: ``{"text", "finish_reason", "usage", "model", "hybridserve"}`` (+ logprobs)."""
        req = self.python_request(request, {**overrides, "stream": False})
        try:
            [one] = self.prepare(req)
            out = await self._deadline(req).run(self.client.generate(one))
        except APIError as e:
            _raise(e)
        sent = req.prompts()[0] if isinstance(req, CompletionRequest) else None
        text, lp = self.text_and_logprobs(req, sent, out)
        res = {"text": text, "finish_reason": oa.finish(out["finish_reason"]),
               "usage": out["usage"], "model": self.model_name, "hybridserve": out["meta"]}
        if lp is not None:
            res["logprobs"] = lp
        return res

    async def stream(self, request: Any, **overrides: Any) -> AsyncIterator[dict]:
        """Streaming (call with ``handle.options(stream=True)``): ``{"text", "index"}`` chunks, then
        ``{"text", "finish_reason", "usage", "hybridserve"}``."""
        req = self.python_request(request, {**overrides, "stream": False})
        if getattr(req, "echo", False):
            raise EngineInputError("echo cannot be streamed; call without stream=True")
        try:
            [one] = self.prepare(req)
            first, gen = await self._deadline(req).run(self.client.start_stream(one))
        except APIError as e:
            _raise(e)
        meta, item = first.get("meta"), first
        chat, offset = isinstance(req, ChatCompletionRequest), 0
        try:
            while True:
                if "error" in item:
                    raise EngineInputError(item["error"]["message"])
                if "finish_reason" in item:
                    yield {"text": item["text"], "finish_reason": oa.finish(item["finish_reason"]),
                           "usage": item["usage"], "hybridserve": {**(meta or {}), **item["meta"]}}
                    return
                chunk = {"text": item["text"], "index": item["index"]}
                lp, offset = oa.chunk_logprobs(item, chat, offset)
                if lp is not None:
                    chunk["logprobs"] = lp
                yield chunk
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            gen.cancel()

    async def dispatch(self, args: tuple, kwargs: dict):
        """A handle call: ``remote(prompt_or_request, stream=..., **params)``."""
        if len(args) != 1:
            raise EngineInputError("call handle.remote(prompt_or_request, **params) with one request")
        request = args[0]
        stream = kwargs.pop("stream", None)
        if stream is None and isinstance(request, dict):
            stream = request.get("stream", False)
            request = {k: v for k, v in request.items() if k != "stream"}
        if stream:
            return self.stream(request, **kwargs)
        return await self.complete(request, **kwargs)
