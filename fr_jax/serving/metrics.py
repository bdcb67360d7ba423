"""The server's Prometheus metrics, in a registry of its own (no process-global state):
queue depth, busy slots, prompt and generated tokens, tokens per expert, time to first token
and inter-token latency; with decode.speculate, expert passes and kept drafts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a fraction of a CPU decode chunk to a long queue wait.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue = Gauge("fr_jax_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("fr_jax_active_slots", "slots decoding a request", registry=r)
        self.slots = Gauge("fr_jax_slots", "slots of the engine (serve.slots)", registry=r)
        self.requests = Counter("fr_jax_requests", "finished requests, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("fr_jax_rejected", "requests answered with an error, by HTTP "
                                "status", ["status"], registry=r)
        self.prompt_tokens = Counter("fr_jax_prompt_tokens", "prompt tokens prefilled",
                                     registry=r)
        self.generated = Counter("fr_jax_generated_tokens", "tokens generated", registry=r)
        self.per_expert = Counter("fr_jax_expert_tokens", "generated tokens by the expert that "
                                  "produced them", ["expert"], registry=r)
        self.spec_passes = Counter("fr_jax_speculative_passes", "expert passes of finished "
                                   "requests (decode.speculate)", registry=r)
        self.spec_kept = Counter("fr_jax_speculative_drafts_kept", "router drafts the fused "
                                 "rule kept in those passes (tokens per pass: (kept + passes) "
                                 "/ passes)", registry=r)
        self.ttft = Histogram("fr_jax_time_to_first_token_seconds", "from arrival to the first "
                              "token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fr_jax_inter_token_latency_seconds", "between a request's "
                             "successive tokens", buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The text exposition format (GET /metrics)."""
        return generate_latest(self.registry)
