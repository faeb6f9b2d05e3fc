"""The server's Prometheus metrics (`GET /metrics`, in Prometheus' text format).

    llama_requests_total{reason}            finished requests by how they ended (stop, length, timeout,
                                            cancelled, error) and refused ones (rejected: the queue was full)
    llama_prompt_tokens_total               prompt tokens of the requests taken
    llama_generation_tokens_total           tokens generated (every choice)
    llama_time_to_first_token_seconds       from submission to a request's first generated token
    llama_time_per_output_token_seconds     between two tokens of one sequence
    llama_e2e_request_latency_seconds       from submission to the end of a request
    llama_requests_waiting / llama_requests_running / llama_sequences_running
    llama_kv_cache_usage_ratio              positions held by running sequences / all positions of the cache
    llama_prefix_cache_hit_rate             prompt tokens found in the prefix cache / prompt tokens looked up
    llama_spec_decode_draft_tokens_total    speculative decoding: draft tokens proposed ...
    llama_spec_decode_accepted_tokens_total ... and kept
    llama_spec_decode_acceptance_rate       kept / proposed, since the start (0 before any draft)

Names follow vLLM's (`vllm:time_to_first_token_seconds`, ...) under our prefix. Each app has
its own registry: two servers in one process (tests) do not share counts.
"""

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets in seconds: from a fast GPU's token (~10 ms) to a long CPU prefill.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    """What the scheduler reports as it goes, and gauges read from it at each scrape.

    Args:
        snapshot: returns the scheduler's state now: {"waiting", "running", "sequences", "kv_cache_usage",
            "prefix_cache_hit_rate", "spec_decode_acceptance_rate"}.
    """

    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llama_requests", "Requests by how they ended", ["reason"], registry=r)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens of the requests taken", registry=r)
        self.generation_tokens = Counter("llama_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("llama_time_to_first_token_seconds", "Submission to first token", registry=r,
                              buckets=TTFT_BUCKETS)
        self.tpot = Histogram("llama_time_per_output_token_seconds", "Time between two tokens of a sequence",
                              registry=r, buckets=TOKEN_BUCKETS)
        self.e2e = Histogram("llama_e2e_request_latency_seconds", "Submission to the end of a request", registry=r,
                             buckets=E2E_BUCKETS)
        self.draft_tokens = Counter("llama_spec_decode_draft_tokens", "Speculative decoding: draft tokens proposed",
                                    registry=r)
        self.accepted_tokens = Counter("llama_spec_decode_accepted_tokens",
                                       "Speculative decoding: draft tokens kept", registry=r)
        gauges = {
            "waiting": ("llama_requests_waiting", "Requests waiting for rows"),
            "running": ("llama_requests_running", "Requests in the batch"),
            "sequences": ("llama_sequences_running", "Sequences (rows) in the batch"),
            "kv_cache_usage": ("llama_kv_cache_usage_ratio", "KV-cache positions held by running sequences"),
            "prefix_cache_hit_rate": ("llama_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache"),
            "spec_decode_acceptance_rate": ("llama_spec_decode_acceptance_rate", "Draft tokens kept / proposed"),
        }
        for key, (name, documentation) in gauges.items():
            Gauge(name, documentation, registry=r).set_function(lambda key=key: snapshot()[key])

    def render(self) -> bytes:
        """Every metric, in Prometheus' text exposition format."""
        return generate_latest(self.registry)
