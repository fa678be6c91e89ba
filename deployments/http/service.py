"""The OpenAI endpoints' logic, apart from HTTP plumbing: each request validated and tokenized once
into frozen :class:`engine.request.Request` objects, fanned out to the model replicas, answered in
OpenAI's shapes."""
from __future__ import annotations

import time
import uuid
from typing import Any

from engine.api import SamplingParams
from engine.errors import EngineInputError
from engine.request import Request, build
from engine.tokenizer import load_tokenizer

from ..config import AppConfig
from . import openai as oa
from .errors import APIError, error_body, from_engine, short
from .fanout import Deadline, DeadlineStream, ModelClient, choice_requests, run_all
from .schemas import (MAX_CALLS, ChatCompletionRequest, Common, CompletionRequest, choices_per_prompt,
                      logprobs_k)


def unsupported(req: Common) -> None:
    """Reject OpenAI arguments the engine cannot honour, with the fix in the message."""
    checks: list[tuple[bool, str, str]] = []
    if isinstance(req, CompletionRequest):
        checks += [
            (req.echo and req.stream, "echo", "echo cannot be streamed; send stream: false"),
            (req.best_of is not None and req.best_of < req.n, "best_of",
             f"best_of ({req.best_of}) must be >= n ({req.n})"),
            (req.stream and (req.best_of or 1) > req.n, "best_of",
             "best_of > n cannot be streamed (the best choices are known only at the end); send stream: false"),
            (req.suffix is not None, "suffix", "suffix is not supported; omit it"),
        ]
    else:
        checks += [(req.top_logprobs is not None and not req.logprobs, "top_logprobs",
                    "top_logprobs needs logprobs: true; send both, or omit top_logprobs")]
    for bad, param, msg in checks:
        if bad:
            raise APIError(msg, param=param, code="unsupported_parameter")


def _is_ray_handle(model: Any) -> bool:
    try:
        from ray.serve.handle import DeploymentHandle
    except ImportError:   # pragma: no cover
        return False
    return isinstance(model, DeploymentHandle)


class OpenAIIngress:
    """Validation, tokenization, fan-out and response building of the OpenAI API (no HTTP here)."""

    def __init__(self, model: Any, app_config: dict | AppConfig):
        self.cfg = app_config if isinstance(app_config, AppConfig) else AppConfig.model_validate(app_config)
        if self.cfg.handle_transport == "grpc" and _is_ray_handle(model):
            model = model.options(_by_reference=False)      # Serve's replica-to-replica gRPC transport
        self.model = model
        self.client = ModelClient(model, self.cfg.retry_after_s)
        self.model_name = self.cfg.model_name
        self.tok = load_tokenizer(self.cfg.engine.model)
        self.vocab_size = int(self.tok.vocab_size)
        self.created = int(time.time())
        self.max_context = self.cfg.engine.max_context
        self.buckets = list(self.cfg.engine.buckets)

    # ------------------------------------------------------------------ one validation
    def _params(self, req: Common) -> SamplingParams:
        max_tokens = req.max_tokens
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        return SamplingParams(
            max_tokens=max_tokens or self.cfg.default_max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=req.top_k or 0, seed=req.seed,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []), ignore_eos=req.ignore_eos,
            logprobs=logprobs_k(req), presence_penalty=req.presence_penalty,
            prompt_logprobs=req.logprobs if isinstance(req, CompletionRequest) and req.echo else None,
            frequency_penalty=req.frequency_penalty, logit_bias=self._logit_bias(req.logit_bias))

    @staticmethod
    def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
        out: dict[int, float] = {}
        for k, v in (raw or {}).items():
            try:
                out[int(k)] = v
            except ValueError:
                raise APIError(f"logit_bias keys are token ids written as strings, like \"50256\"; got "
                               f"{short(k)}", param="logit_bias") from None
        return out

    def _prompt_ids(self, req: Common) -> list[tuple[str, list[int]]]:
        """(param name, token ids) per prompt: the tokenizer's ids (BOS included) or the client's."""
        if isinstance(req, ChatCompletionRequest):
            try:
                return [("messages", self.tok.chat_prompt([{"role": m.role, "content": m.text()}
                                                           for m in req.messages]))]
            except UnicodeError:
                raise
            except Exception as e:     # the model's chat template (or tokenizer) rejects these messages
                raise APIError(f"The model's chat template rejected the messages: {short(str(e), 300)}",
                               param="messages", code="invalid_messages") from None
        out = []
        for i, p in enumerate(req.prompts()):
            where = f"prompt[{i}]" if req.is_batch else "prompt"
            if p == "" or p == []:
                raise APIError(f"{where} is empty: send at least one character or token id.", param="prompt")
            out.append((where, self.tok.encode(p, add_special_tokens=True) if isinstance(p, str) else p))
        return out

    def prepare(self, req: Common) -> list[Request]:
        """The request's engine requests, one per prompt, each validated once (counts before tokenizing)."""
        if req.model is not None and req.model != self.model_name:
            raise APIError(f"The model '{req.model}' does not exist; this server serves "
                           f"'{self.model_name}' (GET /v1/models).", status=404, param="model",
                           code="model_not_found")
        unsupported(req)
        n_prompts = len(req.prompts()) if isinstance(req, CompletionRequest) else 1
        calls = n_prompts * choices_per_prompt(req)
        if calls > MAX_CALLS:
            raise APIError(f"{n_prompts} prompt(s) x {calls // n_prompts} choice(s) = {calls} generations; "
                           f"at most {MAX_CALLS} per request: split the batch", param="prompt")
        params = self._params(req)
        try:
            prompts = self._prompt_ids(req)
        except UnicodeError as e:   # e.g. a lone surrogate ("\ud800") in a JSON string
            raise APIError(f"the prompt is not valid Unicode text ({getattr(e, 'reason', e)}); send UTF-8 "
                           "text without lone surrogates",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt") from None
        out = []
        for where, ids in prompts:
            try:
                out.append(build(ids, params, vocab_size=self.vocab_size, max_context=self.max_context,
                                 buckets=self.buckets))
            except EngineInputError as e:
                msg = str(e).replace("prompt ", f"{where} ", 1) if where.startswith("prompt[") else str(e)
                err = from_engine(type(e)(msg))
                if err.param is None:
                    err.param = next((f for f in ("stop", "logit_bias", "max_tokens", "temperature", "top_p",
                                                  "seed") if f in msg), "prompt")
                raise err from None
        return out

    def _deadline(self, req: Common) -> Deadline:
        limits = [t for t in (self.cfg.request_timeout_s, req.request_timeout_s) if t is not None]
        return Deadline(min(limits) if limits else None)

    # ------------------------------------------------------------------ answers
    async def elsewhere(self, req: Common, prepared: list[Request], request: Any):
        """A response from another replica for this validated HTTP request, or None to serve it here.
        Here: always (the local-first topology overrides it)."""
        return None

    def text_and_logprobs(self, req: Common, prompt: Any, out: dict) -> tuple[str, dict | None]:
        """A finished choice's text and OpenAI logprobs; with echo (completions) the prompt (as the client
        sent it) comes first, its tokens scored too (the first one has null logprob)."""
        chat = isinstance(req, ChatCompletionRequest)
        text, items = out["text"], out.get("logprobs")
        if not chat and req.echo:
            text = (prompt if isinstance(prompt, str) else self.tok.decode(prompt)) + text
            if items is not None:
                items = out["prompt_logprobs"] + items
        return text, (oa.format_logprobs(items, chat) if items is not None else None)

    async def respond(self, req: Common, chat: bool, http_in: float | None = None, request: Any = None):
        from starlette.responses import JSONResponse

        prepared = self.prepare(req)
        deadline = self._deadline(req)
        if (forwarded := await self.elsewhere(req, prepared, request)) is not None:
            return forwarded
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        count = choices_per_prompt(req)
        ranked = count > req.n
        # one engine call per (prompt, choice); OpenAI's choice index: prompt * n + choice
        calls = [(k, r) for k, one in enumerate(prepared) for r in choice_requests(one, count, ranked)]
        if not req.stream:
            outs = await deadline.run(run_all([self.client.generate(r) for _, r in calls]))
            sent = req.prompts() if not chat else [None]
            choices: list[dict] = []
            for k, one in enumerate(prepared):
                mine = outs[k * count:(k + 1) * count]
                if ranked:
                    mine = oa.best_of(mine, req.n, one.params.logprobs is not None)
                for out in mine:
                    text, lp = self.text_and_logprobs(req, sent[k], out)
                    choices.append(oa.choice(len(choices), text, lp, oa.finish(out["finish_reason"]), chat))
            body = oa.completion_body(rid, created, self.model_name, chat, choices,
                                      sum(r.n_tokens for r in prepared), outs)
            return JSONResponse(body, headers=oa.response_headers(outs[0]["meta"]))
        t_in = time.time()
        streams = await deadline.run(run_all([self.client.start_stream(r) for _, r in calls],
                                             undo=lambda started: started[1].cancel()))
        if deadline.at is not None:
            streams = [(f, DeadlineStream(g, deadline)) for f, g in streams]
        first = streams[0][0]
        first["timeline"] = {"ingress_in": t_in, "ingress_first": time.time()}
        if http_in is not None:
            first["timeline"]["http_in"] = http_in
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": self.model_name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def on_failure(e: BaseException) -> dict:
            msg, code = self.client.stream_failure(e)
            return error_body(msg, "server_error", code=code)
        return oa.SSEResponse(oa.sse_stream(streams, [k for k, _ in calls], base, chat, include_usage, on_failure),
                              media_type="text/event-stream",
                              headers={"cache-control": "no-cache", **oa.response_headers(first.get("meta"))})
