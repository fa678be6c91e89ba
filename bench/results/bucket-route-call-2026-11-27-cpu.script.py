# Route-call timing behind HAProxy (CPU). Run from a checkout: HS_REPO=$PWD PYTHONPATH=$PWD python <this file> (HS_REPO defaults to /work/main, where the first run was made)
import os, time, statistics, httpx, ray
os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"; os.environ["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"] = "1"
from ray import serve
from deployments.app import build_app
ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("HS_REPO", "/work/main"), "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"}})
serve.start(http_options={"host": "127.0.0.1", "port": 18400})
args = {"engine": {"model": "tiny", "device": "cpu"}, "num_gpus": 0, "num_replicas": 2, "topology": "colocated", "ingress_router": True}
serve.run(build_app(args), name="hs", route_prefix="/")
time.sleep(3)
st = serve.status().applications["hs"].deployments
print({k: v.replica_states for k, v in st.items()})
body = b'{"prompt": "hello world hello world", "max_tokens": 2}'
for port in []:
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/internal/route", content=body, timeout=5)
        print(port, r.status_code, r.text[:200])
    except Exception as e:
        print(port, type(e).__name__)
def ok(p):
    try:
        return httpx.post(f"http://127.0.0.1:{p}/internal/route", content=body).status_code == 200
    except Exception:
        return False
rp = next(p for p in range(30000, 30010) if ok(p))
ts = []
with httpx.Client() as c:
    for _ in range(100):
        t = time.perf_counter(); r = c.post(f"http://127.0.0.1:{rp}/internal/route", content=body); assert r.status_code == 200; ts.append((time.perf_counter() - t) * 1000)
hz = []
with httpx.Client() as c:
    for _ in range(100):
        t = time.perf_counter(); r = c.get(f"http://127.0.0.1:{rp}/healthz"); hz.append((time.perf_counter() - t) * 1000)
print("healthz p50 %.2f ms" % statistics.median(hz))
print("route p50 %.2f ms p90 %.2f" % (statistics.median(ts), sorted(ts)[89]))
seen = {}
with httpx.Client() as c:
    for n in (5, 20, 40, 100, 200, 5, 20, 40, 100, 200) * 3:
        r = c.post("http://127.0.0.1:18400/v1/completions", json={"prompt": "x" * n, "max_tokens": 2})
        seen.setdefault(n, []).append(r.headers.get("x-hybridserve-replica"))
print({n: sorted(set(v)) for n, v in seen.items()})
serve.shutdown(); ray.shutdown()
