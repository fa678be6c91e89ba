"""Dashboard as code: the committed JSON is the generated one, and `hybridserve dashboards push`
sends exactly the right Grafana API calls (checked against a real HTTP server that records them)."""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments import cli, dashboards, metrics


# ------------------------------------------------------------------ a recording "Grafana"
class RecordingGrafana:
    """Real HTTP server on 127.0.0.1 that records every call and answers like Grafana's API."""

    def __init__(self, folders: list[dict] | None = None):
        self.calls: list[dict] = []
        self.folders = list(folders or [])
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                body = json.loads(raw) if raw else None
                rec.calls.append({"method": self.command, "path": self.path,
                                  "headers": {k.lower(): v for k, v in self.headers.items()},
                                  "body": body})
                path = self.path.split("?")[0]
                if self.command == "GET" and path == "/api/folders":
                    status, out = 200, rec.folders
                elif self.command == "POST" and path == "/api/folders":
                    f = {"id": 7, "uid": "fold-new", "title": body["title"]}
                    rec.folders.append(f)
                    status, out = 200, f
                elif self.command == "POST" and path == "/api/dashboards/db":
                    d = body["dashboard"]
                    status, out = 200, {"id": 1, "uid": d["uid"], "status": "success", "version": 1,
                                        "url": f"/d/{d['uid']}/{d['title']}", "slug": d["title"]}
                else:
                    status, out = 404, {"message": "not found"}
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_committed_json_is_generated():
    assert dashboards.JSON_PATH.read_text() == dashboards.render_json(), (
        "deployments/dashboards/hybridserve.json is stale: run `python -m deployments.dashboards generate`")
    assert cli.main(["dashboards", "generate", "--check"]) == 0


def test_dashboard_covers_every_metric():
    exprs = " ".join(e for _, e in dashboards.panel_queries())
    for spec in metrics.SPECS.values():
        assert re.search(rf"\b{spec.exported}(_bucket)?\b", exprs), f"no panel queries {spec.exported}"
    for name in metrics.AUTOSCALE_METRICS:
        assert f"ray_{name}" in exprs, f"no panel queries ray_{name}"
    for name in ("ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
                 "ray_serve_deployment_replica_healthy"):
        assert name in exprs
    d = dashboards.build_dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    # every Grafana variable used in a query can be substituted for Prometheus
    for _, e in dashboards.panel_queries():
        assert "$" not in dashboards.substitute(e)


def test_generate_writes_file(tmp_path):
    out = tmp_path / "d.json"
    assert cli.main(["dashboards", "generate", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == dashboards.build_dashboard()


def test_push_sends_exact_payload():
    with RecordingGrafana() as g:
        assert cli.main(["dashboards", "push", "--url", g.url, "--token", "s3cret-token"]) == 0
    assert len(g.calls) == 1
    call = g.calls[0]
    assert (call["method"], call["path"]) == ("POST", "/api/dashboards/db")
    assert call["headers"]["authorization"] == "Bearer s3cret-token"
    assert call["headers"]["content-type"].startswith("application/json")
    expected = json.loads(dashboards.JSON_PATH.read_text())
    expected["id"] = None
    assert call["body"] == {"dashboard": expected, "overwrite": True,
                            "message": "hybridserve dashboards push"}


def test_push_into_new_folder_creates_it():
    with RecordingGrafana(folders=[{"id": 3, "uid": "other", "title": "Other"}]) as g:
        assert cli.main(["dashboards", "push", "--url", g.url, "--token", "tok",
                         "--folder", "hybridserve"]) == 0
    assert [(c["method"], c["path"].split("?")[0]) for c in g.calls] == [
        ("GET", "/api/folders"), ("POST", "/api/folders"), ("POST", "/api/dashboards/db")]
    assert all(c["headers"]["authorization"] == "Bearer tok" for c in g.calls)
    assert g.calls[1]["body"] == {"title": "hybridserve"}
    body = g.calls[2]["body"]
    assert body["folderUid"] == "fold-new"
    assert body["overwrite"] is True
    assert body["dashboard"]["uid"] == "hybridserve"


def test_push_into_existing_folder_reuses_it():
    with RecordingGrafana(folders=[{"id": 3, "uid": "hs-folder", "title": "hybridserve"}]) as g:
        assert cli.main(["dashboards", "push", "--url", g.url, "--token", "tok",
                         "--folder", "hybridserve"]) == 0
    assert [(c["method"], c["path"].split("?")[0]) for c in g.calls] == [
        ("GET", "/api/folders"), ("POST", "/api/dashboards/db")]
    assert g.calls[1]["body"]["folderUid"] == "hs-folder"


def test_push_basic_auth_from_url():
    with RecordingGrafana() as g:
        url = g.url.replace("http://", "http://admin:pw@")
        dashboards.push(url, None)
    import base64
    assert g.calls[0]["headers"]["authorization"] == "Basic " + base64.b64encode(b"admin:pw").decode()


def test_push_reports_grafana_errors():
    from grafana_client.client import GrafanaClientError

    with RecordingGrafana() as g:
        with pytest.raises(GrafanaClientError):
            dashboards.push(g.url + "/nonexistent-prefix", "tok")


def test_samples_for_event_maps_contract_events():
    from engine.api import RequestMetrics

    m = RequestMetrics(prompt_tokens=20, bucket=32, path="jit", ttft_s=0.012,
                       token_times_s=[0.002, 0.004], e2e_s=0.02, queue_s=0.001, mixed=True)
    s = metrics.samples_for_event({"type": "request", "metrics": m, "finish_reason": "length",
                                   "output_tokens": 3}, "r1", model="tiny")
    tags = {"model": "tiny", "replica": "r1", "bucket": "32", "path": "jit"}
    base = {"model": "tiny", "replica": "r1"}
    assert s == [
        ("hybridserve_ttft_seconds", 0.012, tags),
        ("hybridserve_tpot_seconds", pytest.approx(0.003), tags),
        ("hybridserve_e2e_seconds", 0.02, tags),
        ("hybridserve_queue_wait_seconds", 0.001, base),
        ("hybridserve_requests_total", 1.0, {**tags, "finish_reason": "length"}),
        ("hybridserve_prompt_tokens_total", 20.0, base),
        ("hybridserve_mixed_prompts_total", 1.0, base),
        ("hybridserve_output_tokens_total", 3.0, base),
    ]
    assert metrics.samples_for_event({"type": "capture", "bucket": 64, "seconds": 0.5}, "r1", "tiny") == [
        ("hybridserve_graph_captures_total", 1.0, {**base, "bucket": "64"}),
        ("hybridserve_graph_capture_seconds", 0.5, base)]
    assert metrics.samples_for_event(
        {"type": "store", "action": "reject", "reason": "HMAC mismatch: manifest abc123"}, "r1", "tiny") == [
        ("hybridserve_store_events_total", 1.0, {**base, "action": "reject", "reason": "hmac_mismatch"})]
    assert metrics.samples_for_event({"type": "other"}, "r1") == []
    # a bad event never raises into the engine thread
    metrics.observe_event({"type": "request"}, "r1")
