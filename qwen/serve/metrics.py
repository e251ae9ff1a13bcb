"""``GET /metrics``: the server's state and history in the Prometheus text format (``prometheus_client``).

Names follow vLLM's (``vllm:num_requests_running`` is ``qwen:num_requests_running`` here), so dashboards made
for vLLM need only the prefix changed:

- gauges read when scraped: requests running (prefilling or decoding) and waiting, the KV cache's use (tokens
  held by running requests over the slots' room), the prefix cache's bytes;
- counters: requests finished by reason (stop, length, cancelled, error), prompt and generated tokens, prefix
  cache lookups, hits and tokens reused, speculative decoding's drafts, guessed and kept tokens, HTTP responses
  by route and status;
- histograms: time to first token, time per output token after the first (inter-token latency), and
  end-to-end request latency, each from the engine's admission queue on.

Sequences are counted when the engine finishes them (``Engine.on_finish``), so requests that a client
abandoned count too (as "cancelled").
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..engine import Engine, Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCounters:
    """The engine's own running totals (prefix cache, speculative decoding), exposed as counters when scraped."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.prefix_cache.stats if self.engine.prefix_cache is not None else None
        for name, field, text in (("lookups", "lookups", "requests that asked the prefix cache"),
                                  ("hits", "hits", "requests that reused at least one cached block"),
                                  ("tokens_reused", "tokens_reused", "prompt tokens taken from the prefix cache")):
            family = CounterMetricFamily(f"qwen:prefix_cache_{name}", text)
            family.add_metric([], getattr(stats, field) if stats is not None else 0)
            yield family
        speculated = self.engine.speculated
        for name, value, text in (("drafts", speculated.drafts, "guesses checked (one sequence in one step)"),
                                  ("draft_tokens", speculated.proposed, "guessed tokens checked"),
                                  ("accepted_tokens", speculated.accepted, "guessed tokens kept")):
            family = CounterMetricFamily(f"qwen:spec_decode_num_{name}", f"speculative decoding: {text}")
            family.add_metric([], value)
            yield family


class Metrics:
    """The metrics of one server (its own registry: several apps in one process, as in the tests, keep theirs
    apart)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = registry = CollectorRegistry()
        Gauge("qwen:num_requests_running", "requests prefilling or decoding", registry=registry).set_function(
            lambda: len(engine.running) + len(engine.prefilling))
        Gauge("qwen:num_requests_waiting", "requests waiting for a batch slot", registry=registry).set_function(
            lambda: len(engine.waiting))
        room = engine.max_batch_size * engine.max_model_len
        Gauge("qwen:kv_cache_usage_perc", "tokens held by running requests over the KV cache slots' room (0-1)",
              registry=registry).set_function(
            lambda: sum(s.computed for s in [*engine.running, *engine.prefilling]) / room)
        Gauge("qwen:prefix_cache_bytes", "bytes of keys and values the prefix cache holds",
              registry=registry).set_function(
            lambda: engine.prefix_cache.stats.bytes if engine.prefix_cache is not None else 0)
        registry.register(_EngineCounters(engine))
        self.finished = Counter("qwen:request_success", "requests finished, by finish reason",
                                ["finished_reason"], registry=registry)
        self.prompt_tokens = Counter("qwen:prompt_tokens", "prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("qwen:generation_tokens", "tokens generated", registry=registry)
        self.ttft = Histogram("qwen:time_to_first_token_seconds", "from arrival in the engine to the first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("qwen:time_per_output_token_seconds", "mean time between a request's output tokens",
                             buckets=TOKEN_BUCKETS, registry=registry)
        self.e2e = Histogram("qwen:e2e_request_latency_seconds", "from arrival in the engine to the finish",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.responses = Counter("qwen:http_responses", "HTTP responses by route and status code",
                                 ["route", "status"], registry=registry)
        engine.on_finish = self.sequence_finished

    def sequence_finished(self, seq: Sequence) -> None:
        """Count a sequence the engine has finished (in the engine's thread)."""
        now = time.perf_counter()
        reason = seq.finish_reason or "unknown"
        self.finished.labels("error" if reason.startswith("error") else reason).inc()
        self.prompt_tokens.inc(len(seq.prompt_ids))
        self.generation_tokens.inc(len(seq.output_ids))
        self.e2e.observe(now - seq.arrival_time)
        if seq.first_token_time is not None:
            self.ttft.observe(seq.first_token_time - seq.arrival_time)
            if len(seq.output_ids) > 1:
                self.itl.observe((now - seq.first_token_time) / (len(seq.output_ids) - 1))

    def response(self, route: str, status: int) -> None:
        self.responses.labels(route, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
