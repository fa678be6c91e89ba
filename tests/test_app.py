"""The Ray Serve application on a real local Ray Serve instance (CPU, tiny preset), over real HTTP.

One module-scoped app (2 model replicas, warm-bucket router, the default gRPC handle transport) serves
every test after the first; the first test runs ``serve run`` on a copy of serve_config.yaml as a
subprocess (own cluster). Back-pressure over gRPC: tests/test_reliability.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
PORT = 0           # picked by the app fixture, just before Serve binds it (hs_serve.free_port)
BASE = ""
APP = "hybridserve"
BUCKETS = [16, 32, 64, 128, 256]          # max_context 256 is appended by EngineConfig anyway
APP_ARGS = {
    "engine": {"model": "tiny", "device": "cpu", "buckets": [16, 32, 64, 128], "max_context": 256},
    "num_replicas": 2,
    "num_cpus": 1,
    "router": {"stats_period_s": 0.5},
}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"    # serve run's log whole, also when it has to be killed
    return env


# --------------------------------------------------------------------------- serve run (first)
def test_serve_run_serve_config_yaml_answers(tmp_path):
    """`serve run serve_config.yaml` comes up unedited (only the port moved to a free one) and answers."""
    from hs_serve import free_port, ray_start_lock

    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert cfg["http_options"]["port"] == 8000
    port = cfg["http_options"]["port"] = free_port()
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    serve_bin = Path(sys.executable).with_name("serve")
    log = open(tmp_path / "serve_run.log", "w")
    starting = contextlib.ExitStack()
    starting.enter_context(ray_start_lock())     # until serve run's Ray has started (hs_serve.ray_start_lock)
    proc = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=REPO, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, started = time.time() + 240, time.time() + 60
        while proc.poll() is None and time.time() < started and \
                "Started a local Ray instance" not in (tmp_path / "serve_run.log").read_text():
            time.sleep(0.2)
        starting.close()
        body = None
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve_run.log").read_text()[-3000:]
            try:
                r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                                  json={"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
                if r.status_code == 200:
                    body = r.json()
                    break
            except (requests.ConnectionError, requests.Timeout):   # not up yet (the proxy may hold it)
                pass
            time.sleep(0.5)
        assert body is not None, "serve run did not answer in 240 s:\n" + (tmp_path / "serve_run.log").read_text()[-3000:]
        assert body["object"] == "text_completion" and body["model"] == "tiny"
        assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    finally:
        starting.close()
        os.killpg(proc.pid, signal.SIGINT)  # our own process group only
        try:     # serve run stops Serve and Ray in seconds, on a busy host in up to a minute: not checked here
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


# --------------------------------------------------------------------------- the shared app
@pytest.fixture(scope="module")
def app():
    import ray
    from ray import serve

    from deployments.app import build_app
    from hs_serve import free_port, ray_start_lock

    global PORT, BASE
    PORT = free_port()
    BASE = f"http://127.0.0.1:{PORT}"
    with ray_start_lock():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": _env()["PYTHONPATH"]}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app(APP_ARGS), name=APP, route_prefix="/")
        yield serve.get_app_handle(APP)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def post(path: str, body, **kw) -> requests.Response:
    return requests.post(BASE + path, json=body, timeout=60, **kw)


def sse_events(resp: requests.Response) -> list:
    """Parse an SSE body into a list of JSON objects, with '[DONE]' kept as the string."""
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in resp.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


GREEDY = {"temperature": 0, "ignore_eos": True}


def test_healthz_and_models(app):
    r = requests.get(BASE + "/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = requests.get(BASE + "/v1/models", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model"


def test_completion_non_streaming(app):
    r = post("/v1/completions", {"model": "tiny", "prompt": "Hello there", "max_tokens": 7, **GREEDY})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["id"].startswith("cmpl-") and b["object"] == "text_completion" and b["model"] == "tiny"
    assert isinstance(b["created"], int)
    (choice,) = b["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    # byte tokenizer: BOS + one token per byte
    assert b["usage"] == {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    assert r.headers["x-hybridserve-bucket"] == "16"
    # greedy decoding is deterministic: same request, same text
    r2 = post("/v1/completions", {"prompt": "Hello there", "max_tokens": 7, **GREEDY})
    assert r2.json()["choices"][0]["text"] == choice["text"]


def test_completion_streaming_sse(app):
    req = {"prompt": "Stream me", "max_tokens": 6, **GREEDY}
    full = post("/v1/completions", req).json()["choices"][0]["text"]
    r = post("/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 10, "completion_tokens": 6,
                                                        "total_tokens": 16}
    token_chunks = [c for c in chunks[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in token_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks[:-1])
    assert len(token_chunks) >= 6  # one chunk per token + the final one
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == full
    tl = token_chunks[-1]["hybridserve"]["timeline"]     # over the default gRPC transport (handle_transport)
    assert tl["http_in"] <= tl["ingress_in"] and tl["replica_in"] <= tl["replica_first"], tl


def test_chat_non_streaming_and_streaming(app):
    req = {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}],
           "max_tokens": 5, **GREEDY}
    r = post("/v1/chat/completions", req)
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["id"].startswith("chatcmpl-") and b["object"] == "chat.completion"
    msg = b["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert b["usage"]["completion_tokens"] == 5
    assert b["usage"]["total_tokens"] == b["usage"]["prompt_tokens"] + 5
    r = post("/v1/chat/completions", {**req, "stream": True})
    ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == msg["content"]


def test_logprobs_completions_and_chat(app):
    """OpenAI logprobs: completions (tokens/token_logprobs/top_logprobs/text_offset) and chat
    (content[{token, logprob, bytes, top_logprobs}]), non-streaming and SSE, the same values both
    ways; greedy picks the likeliest token; the Python handle returns the same object."""
    req = {"prompt": "Logprobs please", "max_tokens": 6, "logprobs": 3, **GREEDY}
    b = post("/v1/completions", req).json()
    choice = b["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    joined = "".join(lp["tokens"])          # a token inside a multi-byte character is "bytes:\xNN"
    assert joined == choice["text"] or "bytes:" in joined
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert v <= 0 and 1 <= len(top) <= 4 and top[tok] == v
        assert v == pytest.approx(max(top.values()))          # greedy: the chosen token is the likeliest
    ev = sse_events(post("/v1/completions", {**req, "stream": True}))
    streamed = [c["choices"][0]["logprobs"] for c in ev[:-1] if c["choices"][0]["logprobs"]]
    assert [s["tokens"][0] for s in streamed] == lp["tokens"]
    assert [s["token_logprobs"][0] for s in streamed] == pytest.approx(lp["token_logprobs"])
    assert [s["text_offset"][0] for s in streamed] == lp["text_offset"]
    assert choice["logprobs"] == app.remote(req["prompt"], max_tokens=6, logprobs=3, **GREEDY).result()["logprobs"]
    no_lp = post("/v1/completions", {**req, "logprobs": None}).json()["choices"][0]
    assert no_lp["logprobs"] is None and no_lp["text"] == choice["text"]

    chat = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 2, **GREEDY}
    c = post("/v1/chat/completions", chat).json()["choices"][0]
    content = c["logprobs"]["content"]
    assert len(content) == 4
    assert bytes(b for x in content for b in x["bytes"]).decode(errors="replace") == c["message"]["content"]
    for x in content:
        assert len(x["top_logprobs"]) == 2
        assert x["token"] == bytes(x["bytes"]).decode(errors="replace") or x["token"].startswith("bytes:")
        assert x["top_logprobs"][0]["logprob"] == pytest.approx(x["logprob"])
    ev = sse_events(post("/v1/chat/completions", {**chat, "stream": True}))
    streamed = [x for e in ev[:-1] if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"]["content"]]
    assert [x["token"] for x in streamed] == [x["token"] for x in content]
    only = post("/v1/chat/completions", {**chat, "top_logprobs": None}).json()["choices"][0]["logprobs"]
    assert [x["top_logprobs"] for x in only["content"]] == [[]] * 4


def test_echo_with_prompt_logprobs(app):
    """echo (completions): the prompt comes back before the completion; with logprobs the prompt's
    tokens are scored too (the first is null), which is what lm-eval's loglikelihood reads."""
    req = {"prompt": "Echo me", "max_tokens": 3, **GREEDY}
    plain = post("/v1/completions", req).json()["choices"][0]["text"]
    b = post("/v1/completions", {**req, "echo": True}).json()
    assert b["choices"][0]["text"] == "Echo me" + plain and b["choices"][0]["logprobs"] is None
    lp = post("/v1/completions", {**req, "echo": True, "logprobs": 1}).json()["choices"][0]["logprobs"]
    n_prompt = b["usage"]["prompt_tokens"]                    # BOS + 7 bytes
    assert len(lp["tokens"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"][1:n_prompt]) == "Echo me"
    completion = post("/v1/completions", {**req, "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][n_prompt:] == pytest.approx(completion["token_logprobs"])
    ids = post("/v1/completions", {**req, "prompt": [1, 72, 108], "echo": True}).json()["choices"][0]["text"]
    assert ids.startswith("Ei")                               # token-id prompt: decoded and echoed
    assert app.remote("Echo me", max_tokens=3, echo=True, **GREEDY).result()["text"] == "Echo me" + plain


def test_n_choices_and_best_of(app):
    """n choices run as parallel engine calls (seed, seed+1, ...): reproducible, choice 0 is the
    single request's answer, usage counts every token; SSE interleaves them by index; best_of
    returns the choice with the highest total logprob."""
    req = {"prompt": "Choices", "max_tokens": 5, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    b = post("/v1/completions", {**req, "n": 3}).json()
    texts = [c["text"] for c in b["choices"]]
    assert [c["index"] for c in b["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert b["usage"]["completion_tokens"] == 15 and len(b["hybridserve"]["choices"]) == 3
    assert [c["text"] for c in post("/v1/completions", {**req, "n": 3}).json()["choices"]] == texts
    assert post("/v1/completions", req).json()["choices"][0]["text"] == texts[0]

    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 1.0, "seed": 2,
            "ignore_eos": True, "n": 2}
    full = post("/v1/chat/completions", chat).json()["choices"]
    ev = sse_events(post("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}))
    assert ev[-1] == "[DONE]" and ev[-2]["usage"]["completion_tokens"] == 8
    for i in (0, 1):
        mine = [e["choices"][0] for e in ev[:-2] if e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == full[i]["message"]["content"]
        assert mine[0]["delta"]["role"] == "assistant"
        assert [c["finish_reason"] for c in mine].count("length") == 1

    three = post("/v1/completions", {**req, "n": 3, "logprobs": 0}).json()["choices"]
    total = [sum(c["logprobs"]["token_logprobs"]) for c in three]
    best = post("/v1/completions", {**req, "best_of": 3}).json()
    assert [c["text"] for c in best["choices"]] == [three[total.index(max(total))]["text"]]
    assert best["choices"][0]["logprobs"] is None and best["usage"]["completion_tokens"] == 15

    from engine.errors import EngineInputError
    with pytest.raises(EngineInputError, match="once per choice"):
        app.remote("x", n=2).result()


def test_batched_prompts(app):
    """A batch of prompts (strings or token-id lists): one engine call per prompt and choice, each
    routed by its own length; choices in OpenAI's order (prompt * n + choice), each equal to the
    single-prompt answer; usage counts each prompt once; SSE carries every choice."""
    single = {p: post("/v1/completions", {"prompt": p, "max_tokens": 4, **GREEDY}).json()["choices"][0]["text"]
              for p in ("Hello there", "Stream me")}
    req = {"prompt": ["Hello there", "Stream me"], "max_tokens": 4, "n": 2, **GREEDY}
    b = post("/v1/completions", req).json()
    assert [c["index"] for c in b["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in b["choices"]] == [single["Hello there"]] * 2 + [single["Stream me"]] * 2
    assert b["usage"] == {"prompt_tokens": 12 + 10, "completion_tokens": 16, "total_tokens": 38}
    ev = sse_events(post("/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": True}}))
    assert ev[-1] == "[DONE]" and ev[-2]["usage"] == b["usage"]
    for c in b["choices"]:
        got = "".join(e["choices"][0]["text"] for e in ev[:-2] if e["choices"][0]["index"] == c["index"])
        assert got == c["text"], c["index"]
    ids = post("/v1/completions", {"prompt": [[1, 72, 108], [1, 73]], "max_tokens": 2, **GREEDY}).json()
    assert len(ids["choices"]) == 2 and ids["usage"]["prompt_tokens"] == 5
    # lm-eval-harness's loglikelihood request: a batch, echo, logprobs 1, one new token
    ll = post("/v1/completions", {"prompt": ["Hello there", "Stream me"], "max_tokens": 1, "echo": True,
                                  "logprobs": 1, "temperature": 0, "seed": 1234}).json()["choices"]
    for c, p in zip(ll, ("Hello there", "Stream me")):
        assert c["text"].startswith(p) and len(c["logprobs"]["tokens"]) == len(p) + 2   # BOS + bytes + 1
        assert c["logprobs"]["token_logprobs"][0] is None
    from engine.errors import EngineInputError
    with pytest.raises(EngineInputError, match="once per prompt"):
        app.remote({"prompt": ["a", "b"]}).result()


def test_logit_bias_and_penalties_over_http(app):
    """logit_bias (token ids as strings) steers the output, streaming too; the penalties stop the
    repeats of a greedy reply."""
    a = str(ord("A") + 3)                   # the tiny preset's byte tokenizer: id = byte + 3
    req = {"prompt": "bias", "max_tokens": 6, "logit_bias": {a: 100}, **GREEDY}
    assert post("/v1/completions", req).json()["choices"][0]["text"] == "AAAAAA"
    ev = sse_events(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                                                  "logit_bias": {a: 100}, "stream": True, **GREEDY}))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-1]) == "AAAAA"
    base = app.remote("repeat after me", max_tokens=40, **GREEDY).result()
    for kind in ("frequency_penalty", "presence_penalty"):
        out = app.remote("repeat after me", max_tokens=40, **{kind: 2.0}, **GREEDY).result()
        assert out["usage"]["completion_tokens"] == 40 and out["text"] != base["text"], kind


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "token ids written as strings"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"7": 150}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "out of range"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs", "needs logprobs: true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 30}, "top_logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "max_tokns": 5}, "max_tokns", "Unrecognized request argument"),
    ("/v1/completions", {"max_tokens": 5}, "prompt", "Missing required parameter"),
    ("/v1/completions", {"prompt": 5}, "prompt", "expected a string or an array of token ids"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n", "less than or equal to 16"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of", "must be >= n"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
    ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "echo", "cannot be streamed"),
    ("/v1/completions", {"prompt": ""}, "prompt", "prompt is empty"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt", "prompt[1] is empty"),
    ("/v1/completions", {"prompt": ["a"] * 33, "n": 2}, "prompt", "at most 64"),
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'user'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools",
     "Unrecognized request argument"),
])
def test_bad_requests_are_400_with_a_message(app, path, body, param, needle):
    r = post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert needle in err["message"] and param.split(".")[0] in err["message"], err


def test_invalid_json_is_400(app):
    r = requests.post(BASE + "/v1/completions", data=b"{not json", timeout=10,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_engine_input_errors_are_400(app, stream):
    """Too long for the context: the engine (in the model replica) rejects it -> 400 with its
    message, also for stream=true (the error arrives before any SSE byte)."""
    r = post("/v1/completions", {"prompt": "y" * 200, "max_tokens": 100, "stream": stream})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "max_tokens" in err["message"] and "context" in err["message"]
    assert err["code"] == "context_length_exceeded"          # OpenAI's code, what its clients look for


def test_unknown_model_is_404(app):
    r = post("/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_python_handle_calls(app):
    from engine.errors import EngineInputError

    out = app.remote("Hello there", max_tokens=7, **GREEDY).result()
    http = post("/v1/completions", {"prompt": "Hello there", "max_tokens": 7, **GREEDY}).json()
    assert out["text"] == http["choices"][0]["text"]
    assert out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    # plain call with a bare prompt, and an OpenAI-style chat dict
    assert isinstance(app.remote("Hi").result()["text"], str)
    chat = app.remote({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 3}).result()
    assert chat["usage"]["completion_tokens"] <= 3
    # streaming variant
    chunks = list(app.options(stream=True).remote("Hello there", stream=True, max_tokens=7, **GREEDY))
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 7
    assert "".join(c["text"] for c in chunks) == out["text"]
    assert [c["index"] for c in chunks[:-1]][:7] == list(range(7))
    chunks2 = list(app.options(stream=True).remote({"prompt": "Hello there", "stream": True,
                                                    "max_tokens": 7, **GREEDY}))
    assert "".join(c["text"] for c in chunks2) == out["text"]
    # errors surface as EngineInputError in the caller
    with pytest.raises(EngineInputError, match="max_tokens"):
        app.remote("x", max_tokens=0).result()
    with pytest.raises(EngineInputError, match="context"):
        app.remote("y" * 200, max_tokens=100).result()
    with pytest.raises(EngineInputError, match="context"):
        list(app.options(stream=True).remote("y" * 200, stream=True, max_tokens=100))


def test_routing_stats_contract(app):
    from ray import serve

    assert app.transport.remote().result() == "grpc"      # AppConfig.handle_transport's default reached the handle

    post("/v1/completions", {"prompt": "z" * 40, "max_tokens": 2})
    model = serve.get_deployment_handle("ModelServer", APP)
    stats = model.stats.remote().result()
    for key, typ in [("buckets", list), ("warm_buckets", list), ("capturing_buckets", list), ("warm_batch_sizes", list),
                     ("running", int), ("waiting", int), ("free_slots", int), ("max_batch", int),
                     ("queue_depth", int), ("ttft_ms_p50", dict), ("warm_source", str), ("replica", str)]:
        assert isinstance(stats[key], typ), key
    assert stats["buckets"] == BUCKETS
    assert stats["warm_source"] == "cpu_served_standin"
    assert stats["user_code_thread"] is True        # AppConfig default (Ray's own)
    assert set(stats["ttft_ms_p50"]) <= set(stats["warm_buckets"])


HR_BUCKETS = [8, 24, 40, 56, 72, 88, 104, 128]   # max_context 128 is the last bucket


def _prompt_for_bucket(bucket: int, rng: random.Random) -> str:
    i = HR_BUCKETS.index(bucket)
    lo = HR_BUCKETS[i - 1] + 1 if i else 2   # >= 1 character after BOS
    n = rng.randint(lo, min(bucket, 120))  # prompt tokens incl. BOS (byte tokenizer)
    return "".join(rng.choice("abcdefghij ") for _ in range(n - 1))


def test_non_streaming_client_disconnect_cancels_every_choice(app):
    """A non-streaming client that disconnects mid-generation, with one choice or two: the model
    replica's engine ends each of its requests as 'cancelled' within seconds (not after all 2,000
    tokens), and the next request is served."""
    import socket

    from ray import serve

    from deployments.app import build_app

    args = {**APP_ARGS, "name": "cancel", "num_replicas": 1,
            "engine": {"model": "tiny", "device": "cpu", "buckets": [16], "max_context": 2100}}
    serve.run(build_app(args), name="cancel", route_prefix="/cancel")
    ms = serve.get_deployment_handle("ModelServer", "cancel")
    try:
        for n in (1, 2):
            before = ms.stats.remote().result()["finish_counts"]
            body = json.dumps({"prompt": "cancel me", "max_tokens": 2000, "ignore_eos": True, "n": n}).encode()
            sk = socket.create_connection(("127.0.0.1", PORT))
            sk.sendall(b"POST /cancel/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.monotonic() + 20      # close once the engine has the request (started)
            while ms.stats.remote().result()["engine"]["in_flight"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            sk.close()
            deadline, stats = time.monotonic() + 20, {}
            while time.monotonic() < deadline:   # until the engine has nothing running or queued
                stats = ms.stats.remote().result()
                if stats["finish_counts"].get("cancelled", 0) > before.get("cancelled", 0) and \
                        stats["engine"]["in_flight"] == 0:
                    break
                time.sleep(0.1)
            counts = stats["finish_counts"]
            # each choice was stopped mid-run ('cancelled') or dropped before it started (no record);
            # none ran to its 2,000 tokens
            assert 1 <= counts.get("cancelled", 0) - before.get("cancelled", 0) <= n, counts
            assert counts.get("length", 0) == before.get("length", 0), counts
            assert stats["engine"]["in_flight"] == 0, stats["engine"]
            cut = [f for f in stats["finishes"] if f["finish_reason"] == "cancelled"][-1]
            assert cut["output_tokens"] < 2000, cut
            r = post("/cancel/v1/completions", {"prompt": "next", "max_tokens": 4, **GREEDY})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        serve.delete("cancel")


def test_warm_bucket_routing_hit_rate(app):
    """Fresh 2-replica app, mixed prompt lengths over 8 buckets: after warm-up (each bucket once),
    >= 90% of requests land on a replica already warm for their bucket, and each bucket stays on
    the replica that warmed it (a load-only router would scatter them)."""
    from ray import serve

    from deployments.app import build_app

    args = {**APP_ARGS, "name": "hitrate",
            "engine": {"model": "tiny", "device": "cpu", "buckets": HR_BUCKETS[:-1], "max_context": 128}}
    serve.run(build_app(args), name="hitrate", route_prefix="/hitrate")
    try:
        rng = random.Random(1234)

        def send(bucket: int) -> tuple[int, str, bool]:
            r = post("/hitrate/v1/completions", {"prompt": _prompt_for_bucket(bucket, rng), "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.headers["x-hybridserve-bucket"] == str(bucket)
            return bucket, r.headers["x-hybridserve-replica"], r.headers["x-hybridserve-warm"] == "1"

        # warm-up: each bucket once, sequentially (replicas are fresh: nothing is warm yet)
        owner: dict[int, str] = {}
        for b in HR_BUCKETS:
            _, rep, warm = send(b)
            assert not warm
            owner[b] = rep
        # cold placements are spread over both replicas (least loaded, then fewest warm/capturing)
        assert len(set(owner.values())) == 2, owner
        time.sleep(1.5)  # record_routing_stats (period 0.5 s) reaches the router

        seq = [rng.choice(HR_BUCKETS) for _ in range(96)]
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(send, seq))
        hit_rate = sum(w for _, _, w in results) / len(results)
        on_owner = sum(rep == owner[b] for b, rep, _ in results) / len(results)
        per_replica = Counter(rep for _, rep, _ in results)
        print(f"hit rate {hit_rate:.3f}, on warm-up owner {on_owner:.3f}, per replica {dict(per_replica)}")
        assert hit_rate >= 0.90
        assert on_owner >= 0.90  # a router ignoring warm state would send ~half elsewhere
        assert len(per_replica) == 2
    finally:
        serve.delete("hitrate")


def test_concurrent_http_streams_share_decode_steps(app):
    """8 concurrent SSE streams over real HTTP: every one completes in full, and the replicas' engines ran more
    than one stream in the same decode steps (continuous batching behind the API, not a queue). Each engine
    counts the most streams it ran at once; the replicas are asked after the streams, when either may answer."""
    import concurrent.futures

    from ray import serve

    model = serve.get_deployment_handle("ModelServer", APP)

    def one(i: int) -> int:
        body = {"prompt": "batch " * (3 + i), "max_tokens": 120, "stream": True, **GREEDY}
        ev = sse_events(post("/v1/completions", body))
        assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] == "length"
        return sum(1 for e in ev[:-1] if e["choices"] and e["choices"][0]["text"] is not None)

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        chunks = list(ex.map(one, range(8)))
    assert all(c >= 100 for c in chunks), chunks
    peak: dict[str, int] = {}
    for _ in range(40):                       # idle replicas tie: the router picks either
        st = model.stats.remote().result()
        peak[st["replica"]] = st["engine"]["peak_running"]
        if len(peak) == 2:
            break
    assert max(peak.values()) > 1, peak
