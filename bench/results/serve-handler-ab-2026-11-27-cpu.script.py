# Serve replica HTTP path by handler style (FastAPI ingress / plain __call__ / raw ASGI, each with and without the user-code thread). python <this file> [rounds]
"""A/B: the HTTP path into a Serve replica (direct ingress) for a tiny JSON POST, by handler style."""
import json, os, statistics, sys, time
os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
import httpx, ray
from fastapi import FastAPI, Request
from ray import serve

fa = FastAPI()

@serve.deployment
@serve.ingress(fa)
class A:
    @fa.post("/internal/route")
    async def route(self, request: Request) -> dict:
        b = await request.body()
        return {"host": "127.0.0.1", "port": 1, "replica_id": "x" * 40, "n": len(b)}

@serve.deployment
class B:
    async def __call__(self, request):
        b = await request.body()
        return {"host": "127.0.0.1", "port": 1, "replica_id": "x" * 40, "n": len(b)}

def build_asgi():
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        out = json.dumps({"host": "127.0.0.1", "port": 1, "replica_id": "x" * 40, "n": len(body)}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
    return app

@serve.deployment
@serve.ingress(build_asgi)
class C:
    pass

ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}})
serve.start(http_options={"host": "127.0.0.1", "port": 18455})
same = {"num_cpus": 0, "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
zero = {"num_cpus": 0}
variants = {"A_fastapi": A.options(ray_actor_options=zero), "B_call": B.options(ray_actor_options=zero), "C_asgi": C.options(ray_actor_options=zero),
            "A_fastapi_same": A.options(ray_actor_options=same),
            "B_call_same": B.options(ray_actor_options=same),
            "C_asgi_same": C.options(ray_actor_options=same)}
for name, d in variants.items():
    serve.run(d.bind(), name=name, route_prefix=f"/{name}")
time.sleep(2)
ports = {}
for p in range(30000, 30040):
    try:
        r = httpx.get(f"http://127.0.0.1:{p}/-/routes", timeout=1)
        for _pre, app in r.json().items():
            ports[app] = p
    except Exception:
        pass
print(ports, flush=True)
body = json.dumps({"prompt": "hello world " * 20, "max_tokens": 16}).encode()
res = {k: [] for k in variants}
clients = {k: httpx.Client() for k in variants}
for _rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    for name in variants:
        url = f"http://127.0.0.1:{ports[name]}/{name}/internal/route"
        c = clients[name]
        for i in range(120):
            t = time.perf_counter(); r = c.post(url, content=body); dt = (time.perf_counter() - t) * 1000
            assert r.status_code == 200, (name, r.status_code, r.text[:200])
            if i >= 20:
                res[name].append(dt)
for k, v in res.items():
    v.sort()
    print(f"{k:16s} p50 {statistics.median(v):.3f} ms  p90 {v[int(.9*len(v))]:.3f}  n={len(v)}")
serve.shutdown(); ray.shutdown()
