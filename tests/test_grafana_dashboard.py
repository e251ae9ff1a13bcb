"""docker/grafana/qwen-dashboard.json against the metrics a real server exposes: every PromQL expression of its
panels names only series that ``Metrics(engine)`` over a real tiny model puts in its exposition (parsed with
prometheus_client's own parser, so the ``_total`` / ``_bucket`` / ``_sum`` / ``_count`` forms are checked exactly),
with labels those series carry; quantiles read ``_bucket`` series, rates read counters; the JSON is a dashboard
Grafana imports anywhere (a Prometheus data source variable, unique panel ids)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwen.engine import Engine
from qwen.sampling import SamplingParams
from qwen.serve.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "docker" / "grafana" / "qwen-dashboard.json"
METRIC = re.compile(r"qwen:[A-Za-z0-9_:]+")  # not [a-z_]: "e2e" has a digit
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
RATE = re.compile(r"\b(?:rate|irate|increase)\(")
QUANTILE = re.compile(r"\bhistogram_quantile\(")
MATCHERS = re.compile(r"(qwen:[A-Za-z0-9_:]+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"\s*")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@pytest.fixture(scope="module")
def exposed(tiny_model, tokenizer) -> dict[str, tuple[str, set[str]]]:
    """Sample name -> (its family's type, the label names its samples carry), from the exposition of a real
    server's metrics after real requests finished (labelled counters have no samples before their first use)."""
    engine = Engine(tiny_model, tokenizer, max_batch_size=2)
    metrics = Metrics(engine)
    prompts = [tokenizer.encode("Hello there"), tokenizer.encode("Hello there, how")]
    seqs = engine.generate(prompts, SamplingParams(max_new_tokens=4, do_sample=False))
    assert all(s.finish_reason for s in seqs)
    metrics.response("/v1/chat/completions", 200)
    metrics.response("unmatched", 404)
    samples: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, (family.type, set()))[1].update(sample.labels)
    assert samples["qwen:request_success_total"] == ("counter", {"finished_reason"})
    assert samples["qwen:e2e_request_latency_seconds_bucket"] == ("histogram", {"le"})
    return samples


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    """Every panel, those inside (collapsed) rows included."""
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


@pytest.fixture(scope="module")
def exprs(dashboard) -> list[str]:
    found = [t["expr"] for p in all_panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert len(found) >= 15 and all(isinstance(e, str) and e.strip() for e in found)
    return found


def call_args(expr: str, pattern: re.Pattern) -> list[str]:
    """The text inside the parentheses of each call the pattern (ending in "(") finds."""
    args = []
    for match in pattern.finditer(expr):
        depth, start = 1, match.end()
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                args.append(expr[start:i])
                break
        else:
            raise AssertionError(f"unclosed call in {expr!r}")
    return args


def test_every_series_the_dashboard_reads_is_exposed(exposed, exprs):
    used = set()
    for expr in exprs:
        names = METRIC.findall(expr)
        assert names, f"no qwen: metric in {expr!r}"
        for name in names:
            assert name in exposed, f"{name} (in {expr!r}) is not in the server's exposition: {sorted(exposed)}"
        used.update(names)
    # ... and the dashboard charts every metric the server has (the _created timestamps aside).
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exposed if not n.endswith("_created")}
    charted = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families - charted == set(), "metrics without a panel"


def test_quantiles_read_buckets_and_rates_read_counters(exposed, exprs):
    quantiles = rates = 0
    for expr in exprs:
        for arg in call_args(expr, QUANTILE):
            quantiles += 1
            names = METRIC.findall(arg)
            assert names and all(n.endswith("_bucket") and exposed[n][0] == "histogram" for n in names), expr
            assert re.search(r"\bby\s*\([^)]*\ble\b", arg), f"quantile over buckets not kept apart by le: {expr!r}"
        for arg in call_args(expr, RATE):
            rates += 1
            names = METRIC.findall(arg)
            assert names, expr
            for name in names:
                kind = exposed[name][0]
                assert (kind == "counter" and name.endswith("_total")) or (
                    kind == "histogram" and name.endswith(("_bucket", "_sum", "_count"))), \
                    f"rate of {name} ({kind}) in {expr!r}: a counter's _total or a histogram's series only"
            assert re.search(r"\[\$__rate_interval\]|\[\d+[smh]\]", arg), f"rate without a range: {expr!r}"
        # A gauge is read as it is; a bucket only inside a quantile.
        inside_rate = {n for a in call_args(expr, RATE) for n in METRIC.findall(a)}
        for name in METRIC.findall(expr):
            if exposed[name][0] in ("counter", "histogram"):
                assert name in inside_rate, f"{name} read raw (not through rate) in {expr!r}"
            if name.endswith("_bucket"):
                assert any(name in a for a in call_args(expr, QUANTILE)), expr
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert expr.count("[") == expr.count("]"), expr
    assert quantiles == 9 and rates >= 10  # p50/p90/p99 of TTFT, inter-token and end-to-end latency


def test_labels_are_ones_the_series_carry(exposed, exprs):
    def carried_by(name: str) -> set[str]:  # (an unknown name is the first test's failure)
        return exposed.get(name, ("", set()))[1] | SCRAPE_LABELS

    for expr in exprs:
        for name, matchers in MATCHERS.findall(expr):
            labels = [m.group(1) for m in MATCHER_LABEL.finditer(matchers)]
            assert ",".join(m.group(0) for m in MATCHER_LABEL.finditer(matchers)).replace(" ", "") == \
                matchers.replace(" ", ""), f"matchers not understood: {matchers!r}"
            assert set(labels) <= carried_by(name), f"{name} does not carry all of {labels}"
        carried = set().union(*(carried_by(n) for n in METRIC.findall(expr)))
        for group in GROUPING.findall(expr):
            assert {g.strip() for g in group.split(",")} <= carried, f"grouping by a missing label: {expr!r}"
    assert any('status=~"[45].."' in e and "route" in e for e in exprs), "no 4xx/5xx by route panel"
    assert any("finished_reason" in e for e in exprs)


def test_dashboard_imports_anywhere(dashboard, exprs, exposed):
    panels = all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["query"].startswith("label_values(qwen:")
        assert all(n in exposed for n in METRIC.findall(variables[name]["query"])), variables[name]["query"]
    source = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel["title"] and panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["datasource"] == source for t in panel["targets"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
    # No two panels overlap on the grid.
    cells = {}
    for panel in panels:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    # Every variable an expression uses is defined (or one of Grafana's own).
    for expr in exprs:
        for braced, plain in VARIABLE.findall(expr):
            assert (braced or plain) in variables or (braced or plain).startswith("__"), expr
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels if p["type"] != "row"}
    assert {units[t] for t in units if "latency" in t.lower() or "first token" in t.lower()} == {"s"}
    assert units["KV cache usage"] == units["Prefix cache hit rate"] == "percentunit"
    assert units["Token throughput"] == units["Prefix cache tokens reused"] == "suffix: tokens/s"
