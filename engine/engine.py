"""HybridEngine: CUDA-graph replay where a graph is warm, JIT kernels where it is not.

One request at a time (batch 1). A request's way:
  tokens -> bucket -> prefill: replay the bucket's graph if captured ("graph"), else the graph of a
  warm bucket at most max_pad_factor times larger ("padded"), else run the same prefill eagerly at
  the bucket's shape with the already-compiled Triton kernels ("jit"); either way the bucket is
  queued for background capture -> decode: replay the one decode graph per token -> token on host;
  the next step is launched before the host turns that token into text (IncrementalText: a short
  window per token) and streams it, so the host's work runs under the GPU's step.
On CPU the same static functions run eagerly ("eager").
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

from . import ops
from .api import (LOGPROB_FLOOR, MAX_LOGPROBS, GenerationResult, Logprob, RequestMetrics, SamplingParams,
                  StreamChunk, TokenLogprobs)
from .config import EngineConfig
from .errors import (EmptyPromptError, EngineClosedError, EngineInputError, EngineStartError, ModelLoadError,
                     PromptTooLongError)
from .model import Llama, ModelArgs, load_checkpoint, random_weights
from .presets import PRESETS
from .sampling import sample, shape_logits
from .tokenizer import ByteTokenizer, HFTokenizer, IncrementalText, Tokenizer
from .worker import EngineThread

log = logging.getLogger("hybridserve.engine")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_graph_bucket(bucket: int, graphs, max_pad_factor: float) -> int | None:
    """The bucket whose graph serves a prompt of this bucket: its own if warm, else the smallest warm
    bucket at most max_pad_factor times larger (a padded replay costs a few ms more; the JIT path
    launches every kernel from Python, several times slower), else None (JIT)."""
    if bucket in graphs:
        return bucket
    larger = [b for b in graphs if isinstance(b, int) and bucket < b <= bucket * max_pad_factor]
    return min(larger) if larger else None


class HybridEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        cfg = (config or EngineConfig()).model_copy(update=overrides) if overrides else (config or EngineConfig())
        self.config = cfg = EngineConfig.model_validate(cfg.model_dump())
        dev = cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device='cuda' but no CUDA GPU is visible; use device='cpu'")
        self.device = torch.device(dev)
        self.dtype = _DTYPES[cfg.dtype] if cfg.dtype != "auto" else (
            torch.float16 if dev == "cuda" else torch.float32)
        self.cuda = self.device.type == "cuda"
        self.max_context = cfg.max_context
        self.buckets = list(cfg.buckets)
        self._listeners: list[Callable[[dict], None]] = []
        self._startup_events: list[dict] = []
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture_costs: dict[int, float] = {}
        self._pending: set[int] = set()
        self._lock = threading.Lock()          # one request on the GPU at a time
        self._state = threading.Lock()         # guards the graph dict / pending set
        self._waiting = 0
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False

        t0 = time.perf_counter()
        self.args, weights, self.tokenizer, self.model_name = self._load(cfg, self.device, self.dtype)
        self.model = Llama(self.args, weights, self.device, self.dtype, cfg.max_context)
        del weights
        self.load_s = time.perf_counter() - t0

        # static buffers: graphs read and write only these
        maxb = self.buckets[-1]
        self.ids = torch.zeros(maxb, dtype=torch.long, device=self.device)
        self.positions = torch.arange(maxb, dtype=torch.long, device=self.device)
        self.seq_len = torch.ones(1, dtype=torch.long, device=self.device)
        self.tok = torch.zeros(1, dtype=torch.long, device=self.device)   # decode input / last sampled
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)   # decode position
        self.logits = torch.zeros(self.args.vocab_size, dtype=torch.float32, device=self.device)
        self._ids_host = torch.zeros(maxb, dtype=torch.long, pin_memory=self.cuda)
        self._ids_np = self._ids_host.numpy()   # a prompt's ids land here: numpy takes a list ~5x faster than torch.tensor
        # logprobs (only when a request asks): the chosen + top-k values and ids land here, copied
        # asynchronously before the next step is launched and read after it, so the step still overlaps
        self._lp_vals = torch.zeros(MAX_LOGPROBS + 1, dtype=torch.float32, pin_memory=self.cuda)
        self._lp_ids = torch.zeros(MAX_LOGPROBS, dtype=torch.long, pin_memory=self.cuda)
        self._lp_event = torch.cuda.Event() if self.cuda else None
        self._one = torch.ones(1, dtype=torch.float32, device=self.device)   # penalties' count increment
        # each step's token lands here (async copy + event) so the next step can be queued before it is read
        self._tok_host = torch.zeros(1, dtype=torch.long, pin_memory=self.cuda)
        self._tok_event = torch.cuda.Event() if self.cuda else None
        # CUDA: queue step i+1 before reading token i (the GPU never waits for the host). CPU: a step runs
        # synchronously at its launch, so the token is read and emitted first and then the next step runs.
        self._read_ahead = self.cuda

        self._executor = EngineThread(cfg.spin_s if self.cuda else 0.0)
        self.graph_mem_bytes = 0
        try:
            self._restore_artifacts()
            if self.cuda:
                ops.use_triton(cfg.kernels != "torch", cfg.skinny_matmul, cfg.fused_gemv_norm)
                self.cuda_stream = torch.cuda.Stream(self.device)
                self._capture_stream = torch.cuda.Stream(self.device)
                self._pool = torch.cuda.graph_pool_handle()
                self._decode_graph: torch.cuda.CUDAGraph | None = None
                self._capture_q: queue.Queue[int | str | None] = queue.Queue()
                self._start_cuda()
                self._executor.submit(self._warm_serving_thread).result()
                self.publish_artifacts()
        except BaseException:
            self.shutdown()     # a failed start leaves no engine or capture thread behind
            raise
        self._serving = True
        gc.freeze()   # start-up objects leave the GC's generations: no long collections mid-request

    # ---------------------------------------------------------------- loading
    @staticmethod
    def _load(cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> tuple[ModelArgs, dict, Tokenizer, str]:
        if cfg.model in PRESETS:
            hf = dict(PRESETS[cfg.model])
            if cfg.num_layers:
                hf["num_hidden_layers"] = cfg.num_layers
            args = ModelArgs.from_hf(hf)
            return args, random_weights(args, device, dtype, cfg.seed), ByteTokenizer(args.vocab_size), cfg.model
        path = Path(cfg.model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"unknown model {cfg.model!r}: not a preset ({', '.join(PRESETS)}) "
                                 "and no such checkpoint directory")
        hf, weights = load_checkpoint(path)
        args = ModelArgs.from_hf(hf)
        try:
            tok = HFTokenizer(path, args.eos_token_ids)
        except Exception as e:
            raise ModelLoadError(f"cannot load the tokenizer of {str(path)!r}: {e}") from None
        return args, weights, tok, path.name

    @classmethod
    def from_pretrained(cls, path_or_preset: str, device: str = "auto", dtype: str | torch.dtype | None = None,
                        **overrides) -> "HybridEngine":
        if isinstance(dtype, torch.dtype):
            dtype = {v: k for k, v in _DTYPES.items()}[dtype]
        return cls(EngineConfig(model=str(path_or_preset), device=device, dtype=dtype or "auto", **overrides))

    # ---------------------------------------------------------------- artifact store
    def _restore_artifacts(self) -> None:
        """Point Triton's compile cache at this fingerprint's dir and fill it from the store (every
        file sha256-checked before it lands); the store's warm buckets join the prewarm list."""
        from artifacts import ArtifactManager, fingerprint, fingerprint_fields

        fields = fingerprint_fields(self.args.hash_dict(), str(self.dtype).replace("torch.", ""), self.device)
        root = Path(self.config.cache_dir or Path.home() / ".cache" / "hybridserve").expanduser()
        cache_dir = root / fingerprint(fields)
        if self.cuda:
            os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
        self.artifacts = ArtifactManager.from_config(self.config, fields, cache_dir)
        self.store_warm: dict[int, float] = {}
        self.restore_result = None
        if not self.artifacts.enabled:
            return
        res = self.artifacts.restore()
        self.restore_result = res
        for why in res.rejected:
            self._emit({"type": "store", "action": "reject", "reason": why})
        if res.error:
            self._emit({"type": "store", "action": "reject", "reason": f"store unavailable: {res.error}"})
        if res.loaded:
            self.store_warm = {b: c for b, c in res.warm_buckets.items() if b in self.buckets}
            self._emit({"type": "store", "action": "load", "reason": f"{res.files} files, entry {res.entry}"})
            log.info("artifact store: loaded %d files in %.2f s; warm buckets %s", res.files, res.seconds,
                     sorted(self.store_warm))

    def publish_artifacts(self, wait: bool = False) -> None:
        """Publish compile artifacts + warm buckets if anything is new (background thread)."""
        if not self.artifacts.enabled:
            return

        def work() -> None:
            costs = {b: round(c * 1e3, 3) for b, c in self._capture_costs.items()}
            if self.artifacts.publish(costs):
                self._emit({"type": "store", "action": "publish", "reason": self.artifacts.fingerprint})
                try:   # each publish is a full entry: keep the newest two of this fingerprint
                    self.artifacts.store.prune(keep=2, fp=self.artifacts.fingerprint)
                except Exception:
                    log.exception("artifact store: prune after publish failed")

        t = threading.Thread(target=work, name="hybridserve-publish", daemon=True)
        t.start()
        if wait:
            t.join()

    # ---------------------------------------------------------------- static step functions
    def _prefill(self, L: int) -> None:
        """Prefill of ids[:L] (real length in self.seq_len): the function each prefill graph
        captures. Leaves the greedy token in self.tok, logits in self.logits, pos = seq_len."""
        logits = self.model.prefill(self.ids[:L], self.positions[:L], self.seq_len)
        self.logits.copy_(logits)
        self.tok.copy_(torch.argmax(logits).view(1))
        self.pos.copy_(self.seq_len)

    def _step(self, decode_graph) -> None:
        """Next token: replay the decode graph (CUDA) or run the same function eagerly."""
        if decode_graph is not None:
            decode_graph.replay()
        else:
            self._decode()

    def _decode(self) -> None:
        """One decode step at self.pos from self.tok: the function the decode graph captures."""
        logits = self.model.decode(self.tok, self.pos)
        self.logits.copy_(logits)
        self.tok.copy_(torch.argmax(logits).view(1))
        self.pos.add_(1)

    def _logprobs_launch(self, k: int) -> None:
        """Queue, on the engine's stream, the log-softmax of self.logits at the chosen token (self.tok)
        and its top k, copied to pinned host memory: call before the next step overwrites the logits."""
        lp = torch.log_softmax(self.logits, dim=-1)
        vals, idx = lp.topk(k) if k else (lp[:0], self.tok[:0])
        self._lp_vals[:k + 1].copy_(torch.cat([lp.gather(0, self.tok), vals]), non_blocking=True)
        self._lp_ids[:k].copy_(idx, non_blocking=True)
        if self._lp_event is not None:
            self._lp_event.record()

    def _logprobs_read(self, k: int, t: int) -> TokenLogprobs:
        """The values _logprobs_launch queued for token t."""
        if self._lp_event is not None:
            self._lp_event.synchronize()
        vals = self._lp_vals[:k + 1].tolist()
        one = self._logprob
        return TokenLogprobs(one(t, vals[0]), [one(i, v) for i, v in zip(self._lp_ids[:k].tolist(), vals[1:])])

    def _logprob(self, i: int, v: float | None) -> Logprob:
        """Token i with its logprob v (-inf and nan reported as LOGPROB_FLOOR) and its own bytes."""
        b = self.tokenizer.token_bytes(i)
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:      # part of a character: OpenAI's "bytes:\\xe6\\x97" form, one per token
            text = "bytes:" + "".join(f"\\x{c:02x}" for c in b)
        if v is not None and not v >= LOGPROB_FLOOR:
            v = LOGPROB_FLOOR
        return Logprob(i, text, v, list(b))

    def _prompt_logprobs(self, ids: list[int], bucket: int, k: int) -> list[TokenLogprobs]:
        """Each prompt token's logprob given the tokens before it, with the k likeliest there (an
        eager pass over the prompt padded to its bucket, as the JIT prefill runs; one sync)."""
        n = len(ids)
        chosen, vals, idx = self.model.prompt_logprobs(self.ids[:bucket], self.positions[:bucket], k, n)
        chosen, vals, idx = chosen.tolist(), vals.tolist(), idx.tolist()
        one = self._logprob
        return [TokenLogprobs(one(ids[0], None), [])] + [
            TokenLogprobs(one(ids[i + 1], chosen[i]), [one(j, v) for j, v in zip(idx[i], vals[i])])
            for i in range(n - 1)]

    # ---------------------------------------------------------------- CUDA graphs
    def _start_cuda(self) -> None:
        """All graph work happens on one capture thread (its cuBLAS handle and the Triton kernels are
        warmed there first): warm-up runs for every bucket (compiles each kernel once), then the
        prewarm buckets largest first (all graphs share one memory pool), then the decode graph."""
        self._start_error: BaseException | None = None
        self._capture_thread = threading.Thread(target=self._capture_loop, name="hybridserve-capture",
                                                daemon=True)
        self._capture_thread.start()
        pre = self.buckets if self.config.prewarm_buckets == "all" else list(self.config.prewarm_buckets)
        pre = sorted(set(pre) | set(self.store_warm))
        if self.config.cuda_graphs:
            self.capture(sorted(pre, reverse=True) + ["decode"])
        else:
            self.capture([])

    def capture(self, buckets: list, wait: bool = True) -> None:
        """Capture prefill graphs for these buckets on the capture thread (and wait for them)."""
        todo = []
        with self._state:
            for b in buckets:
                if b not in self._graphs and b not in self._pending:
                    self._pending.add(b)
                    todo.append(b)
        for b in todo:
            self._capture_q.put(b)
        if wait:
            while any(b in self._pending for b in todo) or not hasattr(self, "compile_s"):
                if self._start_error is not None:
                    raise EngineStartError(f"the engine's start-up compile failed: {self._start_error!r}; "
                                           "see the log for the kernel's error") from self._start_error
                if not self._capture_thread.is_alive():
                    raise EngineClosedError("the engine is shut down: no graph can be captured")
                time.sleep(0.005)

    def _warm_serving_thread(self) -> None:
        """The engine thread's first CUDA work (cuBLAS handle, workspaces) happens here, not on a request."""
        with torch.cuda.stream(self.cuda_stream), torch.inference_mode():
            self.seq_len.fill_(1)
            self._prefill(self.buckets[0])
            self._prefill(1)
            self._decode()
        self.cuda_stream.synchronize()

    def _graph_pool_bytes(self) -> int:
        """Bytes of the segments that belong to the graphs' shared memory pool."""
        pool = tuple(self._pool)
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    def _warm_up(self) -> None:
        """Eager runs of every shape before any capture (start-up only: nothing is being served)."""
        t0 = time.perf_counter()
        with torch.cuda.stream(self._capture_stream), torch.inference_mode():
            self.seq_len.fill_(1)
            for b in self.buckets:
                self._prefill(b)
            self._decode()
        self._capture_stream.synchronize()
        self.compile_s = time.perf_counter() - t0

    def _capture_loop(self) -> None:
        try:
            self._warm_up()
        except BaseException as e:      # start-up fails with this error (capture() raises it), never hangs
            self._start_error = e
            log.exception("start-up warm-up (kernel compile) failed")
            return
        while True:
            b = self._capture_q.get()
            if b is None:
                return
            self._idle.wait()                 # capture in idle gaps, not under load
            t0 = time.perf_counter()
            try:
                g = torch.cuda.CUDAGraph()
                # thread_local: the serving thread may keep launching work while this records
                with torch.inference_mode(), torch.cuda.graph(g, pool=self._pool, stream=self._capture_stream,
                                                              capture_error_mode="thread_local"):
                    if b == "decode":
                        self._decode()
                    else:
                        self._prefill(b)
                dt = time.perf_counter() - t0
                with self._state:
                    if b == "decode":
                        self._decode_graph = g
                    else:
                        self._graphs[b] = g
                        self._capture_costs[b] = dt
                    self.graph_mem_bytes = self._graph_pool_bytes()
                self._emit({"type": "capture", "bucket": b, "seconds": dt})
                log.info("captured %s graph in %.1f ms", b, dt * 1e3)
                if b != "decode" and self._capture_q.empty() and getattr(self, "_serving", False):
                    self.publish_artifacts()      # a bucket warmed while serving: share it
            except Exception:  # a failed capture leaves the bucket on the JIT path
                log.exception("capture of bucket %s failed; it stays on the JIT path", b)
            finally:
                with self._state:
                    self._pending.discard(b)

    # ---------------------------------------------------------------- public helpers
    def warm_buckets(self) -> set[int]:
        with self._state:
            return set(self._graphs)

    def capturing_buckets(self) -> set[int]:
        with self._state:
            return set(self._pending)

    def in_flight(self) -> int:
        return self._waiting

    def add_listener(self, fn: Callable[[dict], None]) -> None:
        """fn(event) for every later event; start-up store/capture events are replayed to it first."""
        for event in list(self._startup_events):
            fn(event)
        self._listeners.append(fn)

    def _emit(self, event: dict) -> None:
        if not getattr(self, "_serving", False):
            self._startup_events.append(event)
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:
                log.exception("engine listener failed")

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise PromptTooLongError(f"prompt of {n} tokens exceeds the largest bucket {self.buckets[-1]}")

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise EmptyPromptError("prompt is empty: send at least one character or token id")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise EmptyPromptError("prompt must be a non-empty string or a non-empty list of token ids")
        V = self.args.vocab_size
        # one C-speed pass each (every prompt of a request comes through here); type(t) is int rejects bools
        if set(map(type, prompt)) != {int} or min(prompt) < 0 or max(prompt) >= V:
            t = next(t for t in prompt if type(t) is not int or not 0 <= t < V)
            raise EngineInputError(f"prompt token id {t!r} is not an integer in [0, {V})")
        return list(prompt)

    def count_tokens(self, prompt: str | list[int]) -> int:
        return len(self.prompt_ids(prompt))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise EmptyPromptError("messages is empty: send at least one message")
        return self.tokenizer.chat_prompt(messages)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise EngineInputError("params must be a SamplingParams")
        params.validate()
        ids = self.prompt_ids(prompt)
        V = self.args.vocab_size
        bad_bias = [t for t in params.logit_bias if t >= V]
        if bad_bias:
            raise EngineInputError(f"logit_bias token id {bad_bias[0]} is out of range [0, {V})")
        n = len(ids)
        if n >= self.max_context:
            raise PromptTooLongError(f"prompt has {n} tokens but the context holds {self.max_context} "
                                     "(prompt + max_tokens); shorten the prompt")
        if n + params.max_tokens > self.max_context:
            raise PromptTooLongError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_context} tokens; lower max_tokens to at most {self.max_context - n}")
        return ids

    # ---------------------------------------------------------------- generation
    def _run(self, ids: list[int], params: SamplingParams,
             on_chunk: Callable[[StreamChunk], None] | None = None,
             cancel: threading.Event | None = None, t_req: float | None = None) -> GenerationResult:
        """ids: the prompt as validate() returned it (the caller validated it before queueing it, so the
        engine thread goes straight to the prefill). t_req: when the request arrived (before any wait for
        the engine thread): TTFT counts from it. The caller counted the request in in_flight() on arrival;
        it leaves the count here, before its finish event goes to the listeners, so no listener sees a
        finished request still in flight."""
        try:
            if self._closed:        # queued behind the shut-down: fail fast, generate nothing
                raise EngineClosedError("the engine shut down before this request ran; retry it")
            t_req = t_req or time.perf_counter()
            bucket = self.bucket_for(len(ids))
            with self._lock:
                self._idle.clear()
                try:
                    res = self._generate_locked(ids, bucket, params, on_chunk, cancel, t_req)
                finally:
                    self._idle.set()
        finally:
            self._count(-1)
        self._emit({"type": "request", "metrics": res.metrics, "finish_reason": res.finish_reason,
                    "output_tokens": len(res.token_ids)})
        return res

    def _submit(self, *args) -> concurrent.futures.Future:
        """Count the request as arrived and queue self._run(*args) for the engine thread, which
        uncounts it; a request cancelled while still queued (its caller gave up) never runs, so
        it is uncounted here."""
        self._count(1)
        try:
            fut = self._executor.submit(self._run, *args)
        except RuntimeError:    # the executor is shut down
            self._count(-1)
            raise EngineClosedError("the engine is shut down; send the request to another replica") from None
        fut.add_done_callback(lambda f: f.cancelled() and self._count(-1))
        return fut

    def _count(self, d: int) -> None:
        """in_flight(): requests from arrival (queued for the engine thread) until done."""
        with self._state:
            self._waiting += d

    def _generate_locked(self, ids, bucket, params, on_chunk, cancel, t_req) -> GenerationResult:
        t_start = time.perf_counter()
        n = len(ids)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        eos |= set(params.stop_token_ids)
        graph_bucket = pick_graph_bucket(bucket, self._graphs, self.config.max_pad_factor) if self.cuda else None
        graph = self._graphs[graph_bucket] if graph_bucket is not None else None
        path = ("graph" if graph_bucket == bucket else "padded") if graph is not None else (
            "jit" if self.cuda else "eager")
        ctx = torch.cuda.stream(self.cuda_stream) if self.cuda else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            self._ids_np[:n] = ids
            self.ids[:n].copy_(self._ids_host[:n], non_blocking=True)
            self.seq_len.fill_(n)
            if graph is not None:
                graph.replay()
            else:   # JIT: the same Triton/cuBLAS kernels launched eagerly, at the bucket's shape so every
                self._prefill(bucket)   # kernel was compiled and loaded at start-up (a new shape can
                                        # lazily load a new cuBLAS kernel: tens of ms on the request)
            if self.cuda and path != "graph" and self.config.cuda_graphs and self.config.background_capture:
                self.capture([bucket], wait=False)
            prompt_lps = (self._prompt_logprobs(ids, bucket, params.prompt_logprobs)
                          if params.prompt_logprobs is not None else None)
            counts = bias = None
            if params.presence_penalty or params.frequency_penalty:
                counts = torch.zeros_like(self.logits)
            if params.logit_bias:
                bias = torch.zeros(self.logits.numel(), dtype=self.logits.dtype)
                bias[list(params.logit_bias)] = torch.tensor(list(params.logit_bias.values()), dtype=bias.dtype)
                bias = bias.to(self.device, non_blocking=True)
            out: list[int] = []
            lps: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
            detok = IncrementalText(self.tokenizer, out)   # reads `out` as it grows
            text = ""                                   # text already emitted
            finish = "length"
            metrics = RequestMetrics(prompt_tokens=n, bucket=bucket, path=path, queue_s=t_start - t_req,
                                     graph_bucket=graph_bucket)
            hold = max((len(s) for s in params.stop), default=1) - 1  # chars that may start a stop string
            decode_graph = self._decode_graph if self.cuda else None
            ahead = self._read_ahead
            shaped = params.shapes_logits
            cut = -1
            t_prev = t_start
            while True:
                if shaped:                              # penalties / bias: pick from the adjusted logits
                    x = shape_logits(self.logits, params, counts, bias)
                    self.tok.copy_(sample(x, params, gen) if gen is not None else torch.argmax(x).view(1))
                elif gen is not None:
                    self.tok.copy_(sample(self.logits, params, gen))
                if counts is not None:                  # on device: no sync
                    counts.index_add_(0, self.tok, self._one)
                if lps is not None:                     # t's logprobs, queued before the next step replaces the logits
                    self._logprobs_launch(params.logprobs)
                self._tok_host.copy_(self.tok, non_blocking=True)
                if self._tok_event is not None:
                    self._tok_event.record()
                cancelled = cancel is not None and cancel.is_set()
                # One step ahead (CUDA): queue the next token's step (it reads self.tok on the device) before
                # this token reaches the host, so the GPU runs steps back to back instead of idling while the
                # host reads a token, emits it and launches the next replay. An EOS token, a stop string or a
                # cancel found below wastes that one step (nothing reads its output); a request queued behind
                # this one starts after it.
                if ahead and len(out) + 1 < params.max_tokens and not cancelled:
                    self._step(decode_graph)
                if self._tok_event is not None:
                    self._tok_event.synchronize()       # the one host wait of a step: this token, not the next
                t = int(self._tok_host[0])
                now = time.perf_counter()
                if out:
                    metrics.token_times_s.append(now - t_prev)
                else:
                    metrics.ttft_s = now - t_req
                t_prev = now
                if t in eos:
                    finish = "stop"
                    break
                out.append(t)
                last = len(out) >= params.max_tokens
                if lps is not None:
                    lps.append(self._logprobs_read(params.logprobs, t))
                lp = lps[-1] if lps else None
                if on_chunk or params.stop:             # else nothing to stream or match: decode at the end
                    full = detok.update()
                    cut = min((i for i in (full.find(s) for s in params.stop) if i >= 0), default=-1)
                    if cut >= 0:                        # stop string: emit up to it, never past it
                        text = self._emit_text(on_chunk, t, len(out) - 1, text, full[:cut], lp=lp)
                        finish = "stop"
                        break
                    safe = len(full) - hold                   # chars that may start a stop string wait
                    if safe > len(text) or on_chunk:
                        text = self._emit_text(on_chunk, t, len(out) - 1, text, full[:max(safe, len(text))],
                                               True, lp)
                if last:
                    break
                if cancelled:
                    finish = "cancelled"
                    break
                if not ahead:                           # CPU: the next step once this token is out
                    self._step(decode_graph)
            if cut < 0:                                 # flush text held back for stop strings
                text = self._emit_text(on_chunk, None, len(out), text, self.tokenizer.decode(out))
        metrics.e2e_s = time.perf_counter() - t_req
        return GenerationResult(token_ids=out, text=text, finish_reason=finish, metrics=metrics, logprobs=lps,
                                prompt_logprobs=prompt_lps)

    @staticmethod
    def _emit_text(on_chunk, tok, index, text: str, upto: str, always: bool = False,
                   lp: TokenLogprobs | None = None) -> str:
        """Send upto[len(text):] as a chunk (every token gets one when always, or when it carries
        logprobs); return upto."""
        delta = upto[len(text):]
        if on_chunk and (delta or always or lp is not None):
            on_chunk(StreamChunk(tok, delta, index, logprobs=lp))
        return upto if len(upto) > len(text) else text

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> GenerationResult:
        """Blocking generation. Runs on the engine thread, like every request (one warm CUDA context,
        cuBLAS handle and stream serve them all)."""
        params = params or SamplingParams()
        return self._submit(self.validate(prompt, params), params, None, None, time.perf_counter()).result()

    async def generate_async(self, prompt: str | list[int], params: SamplingParams | None = None) -> GenerationResult:
        """Like generate(); cancelling the awaiting task (the client went away) ends the request at
        the engine's next decode step (finish_reason "cancelled"), or before it starts if still
        queued, so a batch-1 engine never spends its steps on a reply nobody reads."""
        params = params or SamplingParams()
        ids = self.validate(prompt, params)
        cancel = threading.Event()
        fut = self._submit(ids, params, None, cancel, time.perf_counter())
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> AsyncIterator[StreamChunk]:
        """Token-by-token chunks; the last one carries finish_reason and metrics. Closing the
        generator early (client gone) cancels the generation within one decode step."""
        params = params or SamplingParams()
        ids = self.validate(prompt, params)      # raise input errors before the first chunk
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        t_req = time.perf_counter()

        def push(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:    # the consumer's loop is gone: nobody is listening any more
                cancel.set()

        def done(fut: concurrent.futures.Future) -> None:   # the result or the error: never lost
            if fut.cancelled():
                push(EngineClosedError("the request was dropped before it ran; retry it"))
            else:
                push(fut.exception() or fut.result())

        self._submit(ids, params, push, cancel, t_req).add_done_callback(done)
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerationResult):
                    yield StreamChunk(None, "", len(item.token_ids), item.finish_reason, item.metrics)
                    return
                yield item
        finally:
            cancel.set()        # the engine thread stops at its next step; the result is dropped

    def stats(self) -> dict:
        return {
            "model": self.model_name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "warm_buckets": sorted(self.warm_buckets()), "capturing": sorted(self.capturing_buckets()),
            "capture_ms": {b: round(s * 1e3, 2) for b, s in self._capture_costs.items()},
            "graph_mem_bytes": self.graph_mem_bytes, "weight_bytes": self.model.weight_bytes(),
            "kv_bytes": self.model.kv_bytes(), "in_flight": self.in_flight(),
        }

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True     # the running request finishes; queued ones end with EngineClosedError
        self._executor.shutdown(wait=True)
        if self.cuda and hasattr(self, "_capture_thread"):      # (a start that failed before it began)
            self._capture_q.put(None)
            self._capture_thread.join(timeout=30)
