"""Grafana dashboard as code for hybridserve, and the ``hybridserve dashboards`` CLI.

The dashboard is generated from Python (:func:`build_dashboard`) and committed at
``deployments/dashboards/hybridserve.json``; regenerate it with::

    python -m deployments.dashboards generate          # or: hybridserve dashboards generate

and provision it into Grafana (HTTP API, through grafana-client) with::

    hybridserve dashboards push --url http://grafana:3000 --token $GRAFANA_TOKEN [--folder hybridserve]

Every query reads metrics scraped from Ray's metrics export port: hybridserve's own
(deployments/metrics.py, autoscale/) and Ray Serve's request/replica metrics. Names carry
Ray's ``ray_`` prefix.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

UID = "hybridserve"
TITLE = "hybridserve"
JSON_PATH = Path(__file__).with_name("dashboards") / "hybridserve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Grafana variables used in queries, and what stands for them outside Grafana (tests, docs).
RI = "$__rate_interval"
SEL = 'model=~"$model"'
DEFAULT_VARIABLES = {"__rate_interval": "1m", "model": ".*"}

H = "ray_hybridserve_"     # our metrics as exported by Ray
S = "ray_serve_"           # Ray Serve's own


def _q(percentile: float, metric: str, by: str, sel: str = SEL) -> str:
    selector = f"{{{sel}}}" if sel else ""
    return (f"histogram_quantile({percentile}, sum by (le, {by}) "
            f"(rate({metric}_bucket{selector}[{RI}])))")


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


class _Layout:
    """Places panels on Grafana's 24-column grid, row by row."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1
        self.x = 0
        self.row_h = 0

    def panel(self, title: str, targets: list[tuple[str, str]], *, unit: str = "short",
              description: str = "", kind: str = "timeseries", w: int = 8, h: int = 8,
              decimals: int | None = None) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0
        defaults: dict[str, Any] = {"unit": unit}
        if decimals is not None:
            defaults["decimals"] = decimals
        panel: dict[str, Any] = {
            "type": kind,
            "title": title,
            "description": description,
            "id": self._id(),
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": [_target(expr, legend, chr(ord("A") + i))
                        for i, (expr, legend) in enumerate(targets)],
        }
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "table", "placement": "bottom",
                                           "calcs": ["lastNotNull", "max"]},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        elif kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area"}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def build_dashboard() -> dict[str, Any]:
    """The hybridserve dashboard (Grafana JSON model), deterministic."""
    L = _Layout()

    L.row("Ray Serve: HTTP and replicas")
    L.panel("HTTP requests/s by route and status", [
        (f"sum by (application, route, status_code) (rate({S}num_http_requests_total[{RI}]))",
         "{{route}} {{status_code}}")],
        unit="reqps", description="Ray Serve proxy: ray_serve_num_http_requests_total.")
    L.panel("HTTP error ratio", [
        (f"(sum(rate({S}num_http_error_requests_total[{RI}])) or vector(0)) "
         f"/ sum(rate({S}num_http_requests_total[{RI}]))", "errors / requests")],
        unit="percentunit", decimals=3,
        description="ray_serve_num_http_error_requests_total over all HTTP requests (0 when no errors).")
    L.panel("HTTP latency (Ray Serve proxy)", [
        (_q(0.5, f"{S}http_request_latency_ms", "route", ""), "P50 {{route}}"),
        (_q(0.99, f"{S}http_request_latency_ms", "route", ""), "P99 {{route}}")],
        unit="ms", description="ray_serve_http_request_latency_ms: whole request incl. streaming.")
    L.panel("Healthy replicas", [
        (f"sum by (application, deployment) ({S}deployment_replica_healthy)",
         "{{application}}/{{deployment}}")],
        description="ray_serve_deployment_replica_healthy")
    L.panel("Requests processing at replicas", [
        (f"sum by (deployment) ({S}replica_processing_queries)", "{{deployment}}")],
        description="ray_serve_replica_processing_queries")
    L.panel("Deployment processing latency P99", [
        (_q(0.99, f"{S}deployment_processing_latency_ms", "deployment", ""), "{{deployment}}")],
        unit="ms", description="ray_serve_deployment_processing_latency_ms (replica side).")

    L.row("Engine latency (TTFT, TPOT, end-to-end)")
    L.panel("TTFT by path", [
        (_q(0.5, f"{H}ttft_seconds", "path"), "P50 {{path}}"),
        (_q(0.99, f"{H}ttft_seconds", "path"), "P99 {{path}}")],
        unit="s", description="hybridserve_ttft_seconds: request start to first token; "
                              "path = graph (CUDA-graph replay), padded (replay of a larger warm bucket), "
                              "jit (fallback), eager (CPU).")
    L.panel("TTFT P99 by bucket", [
        (_q(0.99, f"{H}ttft_seconds", "bucket"), "bucket {{bucket}}")],
        unit="s", description="hybridserve_ttft_seconds by prefill bucket.")
    L.panel("Time per output token by path", [
        (_q(0.5, f"{H}tpot_seconds", "path"), "P50 {{path}}"),
        (_q(0.99, f"{H}tpot_seconds", "path"), "P99 {{path}}")],
        unit="s", description="hybridserve_tpot_seconds: mean inter-token gap of each request.")
    L.panel("End-to-end by path", [
        (_q(0.5, f"{H}e2e_seconds", "path"), "P50 {{path}}"),
        (_q(0.99, f"{H}e2e_seconds", "path"), "P99 {{path}}")],
        unit="s", description="hybridserve_e2e_seconds")
    L.panel("Engine queue wait P99 by replica", [
        (_q(0.99, f"{H}queue_wait_seconds", "replica"), "{{replica}}")],
        unit="s", description="hybridserve_queue_wait_seconds")
    L.panel("Tokens/s", [
        (f"sum(rate({H}prompt_tokens_total{{{SEL}}}[{RI}]))", "prompt"),
        (f"sum(rate({H}output_tokens_total{{{SEL}}}[{RI}]))", "output")],
        unit="short", description="hybridserve_prompt_tokens_total, hybridserve_output_tokens_total")

    L.row("Hybrid engine: graph hits, JIT fallbacks, captures, artifact store")
    L.panel("Requests/s by path (graph hits vs JIT fallbacks)", [
        (f"sum by (path) (rate({H}requests_total{{{SEL}}}[{RI}]))", "{{path}}")],
        unit="reqps", description="hybridserve_requests_total by path.")
    L.panel("Graph hit ratio", [
        (f"(sum(rate({H}requests_total{{{SEL},path=~\"graph|padded\"}}[{RI}])) or vector(0)) "
         f"/ sum(rate({H}requests_total{{{SEL}}}[{RI}]))", "graph / all")],
        kind="stat", unit="percentunit", decimals=1,
        description="Share of requests served by CUDA-graph replay, own bucket or padded (0 on the CPU engine).")
    L.panel("Prompts riding in decode steps", [
        (f"(sum(rate({H}mixed_prompts_total{{{SEL}}}[{RI}])) or vector(0)) "
         f"/ sum(rate({H}requests_total{{{SEL}}}[{RI}]))", "mixed / all")],
        kind="stat", unit="percentunit", decimals=1,
        description="hybridserve_mixed_prompts_total: share of prompts that rode in the running streams' decode step "
                    "(one pass over both) instead of prefilling alone.")
    L.panel("Requests/s by bucket and path", [
        (f"sum by (bucket, path) (rate({H}requests_total{{{SEL}}}[{RI}]))", "{{bucket}} {{path}}")],
        unit="reqps", description="hybridserve_requests_total by prefill bucket and path.")
    L.panel("Background graph captures by bucket", [
        (f"sum by (bucket) (increase({H}graph_captures_total{{{SEL}}}[{RI}]))", "bucket {{bucket}}")],
        description="hybridserve_graph_captures_total: captures done per interval.")
    L.panel("Graph capture duration", [
        (_q(0.5, f"{H}graph_capture_seconds", "model"), "P50"),
        (_q(0.99, f"{H}graph_capture_seconds", "model"), "P99")],
        unit="s", description="hybridserve_graph_capture_seconds")
    L.panel("Artifact store events", [
        (f"sum by (action, reason) (increase({H}store_events_total{{{SEL}}}[{RI}]))",
         "{{action}} {{reason}}")],
        description="hybridserve_store_events_total: loads, publishes and rejections.")

    L.row("Queue, routing and autoscaling")
    L.panel("Engine queue depth by replica", [
        (f"sum by (replica) ({H}queue_depth{{{SEL}}})", "{{replica}}")],
        description="hybridserve_queue_depth: running + waiting requests per replica.")
    L.panel("Router choices/s (warm hit or not)", [
        (f"sum by (warm) (rate({H}router_choices_total[{RI}]))", "warm={{warm}}")],
        unit="reqps", description="hybridserve_router_choices_total")
    L.panel("Router warm-hit ratio", [
        (f"(sum(rate({H}router_choices_total{{warm=\"true\"}}[{RI}])) or vector(0)) "
         f"/ sum(rate({H}router_choices_total[{RI}]))", "warm / all")],
        kind="stat", unit="percentunit", decimals=1,
        description="Share of routing decisions that found a replica with the bucket warm.")
    L.panel("Autoscaling: target vs healthy replicas", [
        (f"max by (application, deployment) ({H}autoscale_target_replicas)",
         "target {{application}}/{{deployment}}"),
        (f"sum by (application, deployment) ({S}deployment_replica_healthy)",
         "healthy {{application}}/{{deployment}}")],
        description="hybridserve_autoscale_target_replicas (policy output) and Ray Serve's healthy replicas.")
    L.panel("Autoscaling decisions by direction", [
        (f"sum by (deployment, direction) (increase({H}autoscale_decisions_total[{RI}]))",
         "{{deployment}} {{direction}}")],
        description="hybridserve_autoscale_decisions_total")
    L.panel("Autoscaling input: fleet P99 TTFT", [
        (f"max by (application, deployment) ({H}autoscale_fleet_p99_ttft_seconds)",
         "fleet P99 TTFT {{application}}/{{deployment}}")],
        unit="s", description="hybridserve_autoscale_fleet_p99_ttft_seconds: what the policy compares "
                              "with its objective.")

    return {
        "uid": UID,
        "title": TITLE,
        "description": "hybridserve: hybrid CUDA-graph/JIT LLaMA serving on Ray Serve. "
                       "Generated by deployments/dashboards.py; do not edit by hand.",
        "tags": ["hybridserve", "ray-serve", "llm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "options": []},
            {"name": "model", "label": "Model", "type": "query", "datasource": DS,
             "query": {"query": f"label_values({H}requests_total, model)", "refId": "model"},
             "definition": f"label_values({H}requests_total, model)",
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
             "refresh": 2, "sort": 1, "hide": 0, "options": []},
        ]},
        "annotations": {"list": []},
        "links": [],
        "panels": L.panels,
    }


def render_json(dashboard: dict[str, Any] | None = None) -> str:
    return json.dumps(dashboard if dashboard is not None else build_dashboard(), indent=2, sort_keys=True) + "\n"


def panel_queries(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) of every query target of every panel."""
    d = dashboard if dashboard is not None else build_dashboard()
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replace Grafana variables ($__rate_interval, $model, ${x}) so Prometheus can run expr."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def rep(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", rep, expr)


# ----------------------------------------------------------------------------- Grafana API

def push(url: str, token: str | None, folder: str | None = None,
         dashboard: dict[str, Any] | None = None, message: str = "hybridserve dashboards push",
         timeout: float = 30.0) -> dict[str, Any]:
    """Create or overwrite the dashboard in Grafana; returns Grafana's answer.

    ``folder`` is a folder title: it is looked up (``GET /api/folders``) and created when
    missing (``POST /api/folders``). ``token`` is a Grafana service-account token (Bearer);
    with no token, user:password in the URL is used as basic auth.
    """
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(url, credential=token or None, timeout=timeout)
    payload: dict[str, Any] = {
        "dashboard": {**(dashboard if dashboard is not None else build_dashboard()), "id": None},
        "overwrite": True,
        "message": message,
    }
    if folder:
        folder_uid = None
        for f in api.folder.get_all_folders() or []:
            if f.get("title") == folder:
                folder_uid = f["uid"]
                break
        if folder_uid is None:
            folder_uid = api.folder.create_folder(folder)["uid"]
        payload["folderUid"] = folder_uid
    return api.dashboard.update_dashboard(payload)


def _cmd_generate(args: argparse.Namespace) -> int:
    out = Path(args.output)
    text = render_json()
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is out of date: run `python -m deployments.dashboards generate`", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({len(panel_queries())} queries)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    dashboard = json.loads(Path(args.file).read_text()) if args.file else None
    res = push(args.url, args.token, folder=args.folder, dashboard=dashboard)
    print(f"pushed dashboard {UID!r}: {json.dumps(res, sort_keys=True)}")
    return 0


def add_parser(subparsers: Any) -> None:
    """``hybridserve dashboards {generate,push}`` (called by deployments/cli.py)."""
    p = subparsers.add_parser("dashboards", help="Grafana dashboards: generate JSON, push to Grafana")
    _add_commands(p.add_subparsers(dest="dashboards_command", required=True))


def _add_commands(sub: Any) -> None:

    g = sub.add_parser("generate", help="write the dashboard JSON generated from Python")
    g.add_argument("--output", "-o", default=str(JSON_PATH), help="default: %(default)s")
    g.add_argument("--check", action="store_true", help="only check that --output is up to date")
    g.set_defaults(func=_cmd_generate)

    u = sub.add_parser("push", help="create/overwrite the dashboard in Grafana (grafana-client)")
    u.add_argument("--url", default=os.environ.get("GRAFANA_URL"), required="GRAFANA_URL" not in os.environ,
                   help="Grafana base URL, e.g. http://localhost:3000 (env GRAFANA_URL)")
    u.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"),
                   help="service-account token (env GRAFANA_TOKEN); or put user:pass@ in --url")
    u.add_argument("--folder", default=None, help="folder title (created if missing); default: General")
    u.add_argument("--file", default=None, help="push this JSON instead of the generated dashboard")
    u.set_defaults(func=_cmd_push)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.dashboards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_commands(parser.add_subparsers(dest="dashboards_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
