"""One request's host-side state while the scheduler runs it: its slot, output tokens, text, stop matching and
streaming. The engine thread calls accept() with each token the GPU produced for it."""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable

from .api import GenerationResult, RequestMetrics, SamplingParams, StreamChunk, TokenLogprobs
from .tokenizer import IncrementalText, Tokenizer


class Stream:
    def __init__(self, ids: list[int], bucket: int, params: SamplingParams, tokenizer: Tokenizer,
                 on_chunk: Callable[[StreamChunk], None] | None, cancel: threading.Event | None, t_req: float):
        self.ids, self.bucket, self.params, self.tokenizer = ids, bucket, params, tokenizer
        self.on_chunk, self.cancel, self.t_req = on_chunk, cancel, t_req
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.slot = -1
        self.launched = 0           # tokens whose computation is queued on the device
        self.done = False
        self.out: list[int] = []
        self.lps: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_lps: list[TokenLogprobs] | None = None
        self.eos = (set() if params.ignore_eos else set(tokenizer.eos_token_ids)) | set(params.stop_token_ids)
        self.metrics = RequestMetrics(prompt_tokens=len(ids), bucket=bucket, path="")
        self._detok = IncrementalText(tokenizer, self.out)
        self._text = ""                  # text already emitted
        self._hold = max((len(s) for s in params.stop), default=1) - 1   # chars that may start a stop string
        self._checked = 0                # text length already searched for stop strings
        self._cut = -1
        self._t_prev = 0.0
        self.finish_reason = "length"

    @property
    def cancelled(self) -> bool:
        return (self.cancel is not None and self.cancel.is_set()) or self.future.cancelled()

    @property
    def wants_more(self) -> bool:
        """Whether another decode step should run for this stream."""
        return not self.done and self.launched < self.params.max_tokens

    def start(self, slot: int, path: str, graph_bucket: int | None) -> None:
        self.slot = slot
        self.metrics.path, self.metrics.graph_bucket = path, graph_bucket
        self.metrics.queue_s = time.perf_counter() - self.t_req
        self.launched = 1

    def accept(self, t: int, lp: TokenLogprobs | None) -> None:
        """The next token from the device. Sets done when the stream ends (EOS, stop string, max_tokens)."""
        now = time.perf_counter()
        if self.out or self._t_prev:
            self.metrics.token_times_s.append(now - self._t_prev)
        else:
            self.metrics.ttft_s = now - self.t_req
        self._t_prev = now
        if t in self.eos:
            return self.finish("stop")
        self.out.append(t)
        if self.lps is not None:
            self.lps.append(lp)
        stops = self.params.stop
        if self.on_chunk or stops:             # else nothing to stream or match: decode at the end
            full = self._detok.update()
            if stops:                          # only the new tail can hold a stop string not seen before
                lo = max(0, self._checked - self._hold)
                found = [i for i in (full.find(s, lo) for s in stops) if i >= 0]
                self._checked = len(full)
                if found:
                    self._cut = min(found)
                    self._emit(t, full[:self._cut], lp=lp)
                    return self.finish("stop")
            self._emit(t, full[:max(len(full) - self._hold, len(self._text))], True, lp)
        if len(self.out) >= self.params.max_tokens:
            self.finish("length")
        elif self.cancelled:
            self.finish("cancelled")

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done, self.finish_reason = True, reason
        if self._cut < 0:                      # flush text held back for stop strings
            self._emit(None, self.tokenizer.decode(self.out))
        self.metrics.e2e_s = time.perf_counter() - self.t_req

    def result(self) -> GenerationResult:
        return GenerationResult(token_ids=self.out, text=self._text, finish_reason=self.finish_reason,
                                metrics=self.metrics, logprobs=self.lps, prompt_logprobs=self.prompt_lps)

    def _emit(self, tok: int | None, upto: str, always: bool = False, lp: TokenLogprobs | None = None) -> None:
        """Send upto[len(text):] as a chunk (every token gets one when always, or when it carries logprobs)."""
        delta = upto[len(self._text):]
        if self.on_chunk and (delta or always or lp is not None):
            index = len(self.out) - 1 if tok is not None else len(self.out)
            self.on_chunk(StreamChunk(tok, delta, index, logprobs=lp))
        if len(upto) > len(self._text):
            self._text = upto
