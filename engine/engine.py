"""HybridEngine: continuous batching over KV slots, CUDA-graph replay where a graph is warm, JIT kernels where
it is not.

A request's way: validate -> wait for a free KV slot -> prefill into it (its bucket's graph, a larger warm
bucket's graph ("padded"), or the same function eagerly at the bucket's shape ("jit"), the bucket then captured
in the background; while other streams decode, it rides in their next decode step instead (metrics.mixed)) -> join the
running batch: each decode step replays the graph of the smallest warm batch
size >= the running streams -> per-row sampling on device -> tokens to the host one step behind the GPU, text
and stops per stream (engine/scheduler.py). On CPU the same functions run eagerly ("eager")."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

from . import request
from .api import LOGPROB_FLOOR, GenerationResult, Logprob, SamplingParams, StreamChunk
from .config import EngineConfig
from .errors import EmptyPromptError, EngineClosedError, EngineInputError, ModelLoadError
from .graphs import GraphCache
from .kv import KVSlots
from .model import Llama, ModelArgs, load_checkpoint, random_weights
from .plan import KernelPlan
from .presets import PRESETS
from .runner import Runner
from .scheduler import Scheduler, full_batch_cost_ms, pick_batch_size
from .sequence import Stream
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("hybridserve.engine")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
        self.max_batch = cfg.slots(self.cuda)
        self.batch_sizes = cfg.batch_sizes(self.cuda)
        self.plan = KernelPlan.from_config(cfg, self.device)
        self._listeners: list[Callable[[dict], None]] = []
        self._startup_events: list[dict] = []
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._closed = False
        self._serving = False
        self.graphs: GraphCache | None = None
        self.scheduler: Scheduler | None = None

        t0 = time.perf_counter()
        self.args, weights, self.tokenizer, self.model_name = self._load(cfg, self.device, self.dtype)
        a = self.args
        self.kv = KVSlots(a.n_layers, self.max_batch, a.n_kv_heads, cfg.max_context, a.head_dim, self.device,
                          self.dtype)
        self.model = Llama(a, weights, self.device, self.dtype, self.kv, self.plan)
        del weights
        self.load_s = time.perf_counter() - t0
        self.runner = Runner(self.model, self.buckets, self.max_batch, max(self.batch_sizes), self.device)
        try:
            self._restore_artifacts()
            self.scheduler = Scheduler(
                self.runner, self.kv, None, sizes=self.batch_sizes, max_pad_factor=cfg.max_pad_factor,
                max_waiting=cfg.max_waiting if cfg.max_waiting is not None else 4 * self.max_batch,
                tpot_slo_ms=cfg.tpot_slo_ms, spin_s=cfg.spin_s if self.cuda else 0.0,
                admit_window=cfg.admit_window, mixed_buckets=cfg.mixed_buckets(), logprob=self._logprob,
                on_jit=self._on_jit, on_finish=self._finished)
            if self.cuda:
                self._start_cuda()
            self._measure_steps()
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
            return args, random_weights(args, device, dtype, cfg.seed), load_tokenizer(cfg.model), cfg.model
        path = Path(cfg.model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"unknown model {cfg.model!r}: not a preset ({', '.join(PRESETS)}) "
                                 "and no such checkpoint directory")
        hf, weights = load_checkpoint(path)
        args = ModelArgs.from_hf(hf)
        try:
            tok = load_tokenizer(str(path), args.eos_token_ids)
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
        """Point Triton's compile cache at this fingerprint's dir and fill it from the store (only signed
        entries this replica trusts); the store's warm buckets and batch sizes join the prewarm lists."""
        from artifacts import ArtifactManager, fingerprint, fingerprint_fields

        fields = fingerprint_fields(self.args.hash_dict(), str(self.dtype).replace("torch.", ""), self.device)
        root = Path(self.config.cache_dir or Path.home() / ".cache" / "hybridserve").expanduser()
        cache_dir = root / fingerprint(fields)
        if self.cuda:
            os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
        self.artifacts = ArtifactManager.from_config(self.config, fields, cache_dir)
        self.store_warm: dict[int, float] = {}
        self.store_warm_batches: dict[int, float] = {}
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
            self.store_warm_batches = {b: c for b, c in res.warm_batches.items() if b in self.batch_sizes}
            self._emit({"type": "store", "action": "load", "reason": f"{res.files} files, entry {res.entry}"})
            log.info("artifact store: loaded %d files in %.2f s; warm buckets %s", res.files, res.seconds,
                     sorted(self.store_warm))

    def publish_artifacts(self, wait: bool = False) -> None:
        """Publish compile artifacts + warm buckets if anything is new (background thread)."""
        if not self.artifacts.enabled or self.graphs is None:
            return

        def work() -> None:
            if self.artifacts.publish(self.graphs.cost_ms("prefill"), self.graphs.cost_ms("decode")):
                self._emit({"type": "store", "action": "publish", "reason": self.artifacts.fingerprint})
                try:   # each publish is a full entry: keep the newest two of this fingerprint
                    self.artifacts.store.prune(keep=2, fp=self.artifacts.fingerprint)
                except Exception:
                    log.exception("artifact store: prune after publish failed")

        t = threading.Thread(target=work, name="hybridserve-publish", daemon=True)
        t.start()
        if wait:
            t.join()

    # ---------------------------------------------------------------- CUDA graphs
    def _start_cuda(self) -> None:
        """Warm-up (every kernel compiled once) and every graph capture happen on one capture thread: the
        prewarm buckets largest first (one shared memory pool), then the prewarm decode batch sizes; the engine
        thread runs its first CUDA work (cuBLAS handle, workspaces) before ready."""
        cfg = self.config
        self.graphs = GraphCache(self.device, self._run_key, self.scheduler.idle, self._captured)
        self.scheduler.graphs = self.graphs
        self.graphs.start(self._warm_up)
        pre = self.buckets if cfg.prewarm_buckets == "all" else list(cfg.prewarm_buckets)
        pre = sorted(set(pre) | set(self.store_warm), reverse=True)
        sizes = self.batch_sizes if cfg.prewarm_batch_sizes == "all" else [
            b for b in cfg.prewarm_batch_sizes if b in self.batch_sizes]
        sizes = sorted(set(sizes) | set(self.store_warm_batches), reverse=True)
        mixed = set(cfg.mixed_buckets())
        keys = [("prefill", b) for b in pre] + [("decode", b) for b in sizes] + [
            ("mixed", b, n) for b in pre if b in mixed for n in sizes] if cfg.cuda_graphs else []
        self.graphs.capture(keys)
        self.scheduler.call(self._warm_serving_thread).result()

    def _run_key(self, key: tuple) -> None:
        {"prefill": self.runner.prefill_fn, "decode": self.runner.decode_fn, "mixed": self.runner.mixed_fn}[key[0]](
            *key[1:])

    def _warm_up(self) -> None:
        """Eager runs of every shape before any capture, all in the scratch slot (nothing is being served)."""
        r = self.runner
        r.seq_len.fill_(1)
        r.slot.fill_(self.kv.scratch)
        for b in self.buckets:
            r.prefill_fn(b)
        for b in sorted(self.batch_sizes, reverse=True):     # largest first: the attention scratch fits all
            r.decode_fn(b)
        if self.config.mixed_buckets():        # the fewest mixed rows: the one row tile no prefill may have used
            r.mixed_fn(self.buckets[0], 1)

    def _warm_serving_thread(self) -> None:
        r = self.runner
        with r.ctx():
            r.seq_len.fill_(1)
            r.slot.fill_(self.kv.scratch)
            r.prefill_fn(self.buckets[0])
            r.decode_fn(1)
        r.stream.synchronize()

    def _captured(self, key: tuple, seconds: float) -> None:
        label = key[1] if key[0] == "prefill" else ":".join(str(k) for k in key)
        self._emit({"type": "capture", "bucket": label, "seconds": seconds})
        if key[0] == "prefill" and self._serving:
            self.publish_artifacts()      # a bucket warmed while serving: share it

    def _on_jit(self, key: tuple) -> None:
        """A shape ran without its graph: capture it in the background."""
        if self.config.cuda_graphs and self.config.background_capture:
            self.graphs.capture([key], wait=False)

    def capture(self, buckets: list[int], wait: bool = True) -> None:
        """Capture prefill graphs for these buckets on the capture thread (and wait for them)."""
        self.graphs.capture([("prefill", b) for b in buckets], wait)

    def _measure_steps(self) -> None:
        """Decode step times at a short context, the start of the scheduler's estimates: every batch size with a
        TPOT objective (it caps the batch), else the full batch's alone (full_batch_step_ms)."""
        sizes = self.batch_sizes if self.config.tpot_slo_ms is not None else [max(self.batch_sizes)]
        for b in sizes:
            ts = self.time_decode_steps(b, min(16, self.max_context - 1), 5)
            self.scheduler.step_ms[b] = sorted(ts)[len(ts) // 2] * 1e3

    def time_decode_steps(self, batch: int, context: int, steps: int) -> list[float]:
        """Seconds per decode step with `batch` streams at `context` positions (CUDA events around each graph
        replay or JIT step; CPU: wall time). Runs on the engine thread once no stream runs (benchmarks)."""
        if not 1 <= batch <= self.max_batch or not 1 <= context < self.max_context:
            raise EngineInputError(f"batch must be in [1, {self.max_batch}] and context in [1, {self.max_context})")

        def run() -> list[float]:
            r = self.runner
            B, warm = pick_batch_size(batch, self.batch_sizes, self.graphs.warm("decode") if self.graphs else set())
            graph = self.graphs.get(("decode", B)) if warm else None
            times = []
            with r.ctx():
                r.set_rows(list(range(batch)), B)
                for _ in range(steps):
                    r.pos_s[:batch].fill_(context)
                    if self.cuda:
                        ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        ev[0].record()
                    t0 = time.perf_counter()
                    graph.replay() if graph is not None else r.decode_fn(B)
                    if self.cuda:
                        ev[1].record()
                        ev[1].synchronize()
                        times.append(ev[0].elapsed_time(ev[1]) / 1e3)
                    else:
                        times.append(time.perf_counter() - t0)
                r.pos_s[:batch].zero_()
            return times

        return self.scheduler.call(run).result()

    # ---------------------------------------------------------------- public helpers
    def warm_buckets(self) -> set[int]:
        return self.graphs.warm("prefill") if self.graphs else set()

    def warm_batch_sizes(self) -> set[int]:
        return self.graphs.warm("decode") if self.graphs else set()

    def capturing_buckets(self) -> set[int]:
        return self.graphs.pending("prefill") if self.graphs else set()

    def in_flight(self) -> int:
        """Requests from arrival (waiting for a slot) until done."""
        return self._in_flight

    def full_batch_step_ms(self) -> float | None:
        """The decode step at the batch cap, measured (or from the nearest measured: scheduler.py's
        full_batch_step_ms)."""
        return self.scheduler.full_batch_step_ms() if self.scheduler else None

    def full_batch_cost_ms(self, metrics, tokens: int) -> float | None:
        """What a finished request of `tokens` output tokens cost of a full-batch replica (scheduler.py's
        full_batch_cost_ms): its prefill as admission -> first token (a mixed prompt: less the decode step it rode in,
        which the batch ran anyway), its other tokens at the batch cap's step.
        None for a request that never produced a token, or before any step was measured."""
        step = self.full_batch_step_ms()
        if step is None or metrics.ttft_s <= 0:
            return None
        prefill_ms = max(0.0, metrics.ttft_s - metrics.queue_s - getattr(metrics, "rode_s", 0.0)) * 1e3
        return full_batch_cost_ms(prefill_ms, tokens, step, self.scheduler.cap)

    def heartbeat_age_s(self) -> float:
        """Seconds since the scheduler's last step while work is in flight (0.0 when idle): a stuck engine
        thread shows here."""
        return self.scheduler.heartbeat_age_s() if self.scheduler else 0.0

    def add_listener(self, fn: Callable[[dict], None]) -> None:
        """fn(event) for every later event; start-up store/capture events are replayed to it first."""
        for event in list(self._startup_events):
            fn(event)
        self._listeners.append(fn)

    def _emit(self, event: dict) -> None:
        if not self._serving:
            self._startup_events.append(event)
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:
                log.exception("engine listener failed")

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

    def bucket_for(self, n: int) -> int:
        return request.bucket_for(n, self.buckets)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise EmptyPromptError("prompt is empty: send at least one character or token id")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return request.check_ids(prompt, self.args.vocab_size)

    def count_tokens(self, prompt: str | list[int]) -> int:
        return len(self.prompt_ids(prompt))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise EmptyPromptError("messages is empty: send at least one message")
        return self.tokenizer.chat_prompt(messages)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return request.validate(self.prompt_ids(prompt), params, self.args.vocab_size, self.max_context)

    def _request(self, prompt: str | list[int] | request.Request, params: SamplingParams | None) -> request.Request:
        """A Request built by the serving layer is trusted as it is; anything else is validated here, once."""
        if isinstance(prompt, request.Request):
            return prompt
        params = params or SamplingParams()
        ids = self.validate(prompt, params)
        return request.Request(tuple(ids), params, self.bucket_for(len(ids)))

    # ---------------------------------------------------------------- generation
    def _submit(self, req: request.Request, on_chunk=None, cancel=None) -> Stream:
        """Queue a validated request for a slot; it counts in in_flight() from here until it is done."""
        if self._closed:
            raise EngineClosedError("the engine is shut down; send the request to another replica")
        st = Stream(list(req.ids), req.bucket, req.params, self.tokenizer, on_chunk, cancel, time.perf_counter())
        with self._count_lock:
            self._in_flight += 1
        try:
            self.scheduler.submit(st)
        except BaseException:
            with self._count_lock:
                self._in_flight -= 1
            raise
        return st

    def _finished(self, st: Stream) -> None:
        """Engine thread, before the request's future completes: out of in_flight, then its event."""
        with self._count_lock:
            self._in_flight -= 1
        if st.metrics.path:
            self._emit({"type": "request", "metrics": st.metrics, "finish_reason": st.finish_reason,
                        "output_tokens": len(st.out)})

    def generate(self, prompt: str | list[int] | request.Request,
                 params: SamplingParams | None = None) -> GenerationResult:
        """Blocking generation (the scheduler batches it with every other request in flight)."""
        return self._submit(self._request(prompt, params)).future.result()

    async def generate_async(self, prompt: str | list[int] | request.Request,
                             params: SamplingParams | None = None) -> GenerationResult:
        """Like generate(); cancelling the awaiting task (the client went away) ends the request at the engine's
        next step (finish_reason "cancelled"), or before it starts if still waiting, freeing its slot."""
        cancel = threading.Event()
        st = self._submit(self._request(prompt, params), None, cancel)
        try:
            return await asyncio.wrap_future(st.future)
        except asyncio.CancelledError:
            cancel.set()
            self.scheduler.drop(st)
            raise

    async def stream(self, prompt: str | list[int] | request.Request,
                     params: SamplingParams | None = None) -> AsyncIterator[StreamChunk]:
        """Token-by-token chunks; the last one carries finish_reason and metrics. Closing the generator early
        (client gone) cancels the generation within one decode step."""
        req = self._request(prompt, params)      # raise input errors before the first chunk
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def push(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:    # the consumer's loop is gone: nobody is listening any more
                cancel.set()

        st = self._submit(req, push, cancel)
        st.future.add_done_callback(lambda f: push(f.exception() or f.result()))
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
            cancel.set()        # the engine stops the stream at its next step; the result is dropped
            self.scheduler.drop(st)

    def stats(self) -> dict:
        s = self.scheduler
        running = len(s.running) if s else 0
        cap = s.cap if s else self.max_batch
        return {
            "model": self.model_name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "warm_buckets": sorted(self.warm_buckets()), "capturing": sorted(self.capturing_buckets()),
            "warm_batch_sizes": sorted(self.warm_batch_sizes()),
            "capture_ms": self.graphs.cost_ms("prefill") if self.graphs else {},
            "graph_mem_bytes": self.graphs.pool_bytes() if self.graphs else 0,
            "weight_bytes": self.model.weight_bytes(), "kv_bytes": self.kv.nbytes(), "in_flight": self.in_flight(),
            "running": running, "peak_running": s.peak_running if s else 0, "waiting": len(s.waiting) if s else 0,
            "mixed_steps": s.mixed_steps if s else 0, "warm_mixed": len(self.graphs.warm("mixed")) if self.graphs else 0,
            "max_batch": cap,
            "free_slots": max(0, cap - running), "slots": self.max_batch,
            "step_ms": {b: round(v, 3) for b, v in sorted(s.step_ms.items())} if s else {},
            "full_batch_step_ms": self.full_batch_step_ms(),
        }

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True     # running streams finish; waiting ones end with EngineClosedError
        if self.scheduler is not None:
            self.scheduler.close()
        if self.graphs is not None:
            self.graphs.close()
