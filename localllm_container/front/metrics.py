"""What /metrics shows, the same on both engines, measured at the front: llama-server's
`llamacpp:*` names where the meaning is the same, `localllm_*` for the rest. The table
in docs/en/operations.md lists them; tests/test_operations.py checks the dashboard's."""
from __future__ import annotations


from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: one sample per counter, as llama-server's

OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 300)  # up to node-api's 180 s and beyond


class Metrics:
    """The registry /metrics renders, and the updates the front makes to it."""

    def __init__(self, engine: str, alias: str, slots: int, max_queue: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("localllm_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.rejected = Counter("localllm_requests_rejected", "Requests answered 503 at once because "
                                "MAX_QUEUE requests were already waiting", registry=r)
        self.processing = Gauge("llamacpp:requests_processing", "Number of requests processing", registry=r)
        self.deferred = Gauge("llamacpp:requests_deferred", "Number of requests deferred", registry=r)
        self.prompt_tokens = Counter("localllm_prompt_tokens", "Prompt tokens of the answers (usage.prompt_tokens: "
                                     "reused ones included)", registry=r)
        self.predicted = Counter("llamacpp:tokens_predicted", "Number of generation tokens processed", registry=r)
        self.first_token = Histogram("localllm_time_to_first_token_seconds", "From a streamed request's arrival "
                                     "to its first token", ["route"], buckets=SECONDS, registry=r)
        self.duration = Histogram("localllm_request_duration_seconds", "From a model request's arrival to the "
                                  "end of its answer", ["route"], buckets=SECONDS, registry=r)
        self.speed = Gauge("llamacpp:predicted_tokens_seconds", "Average generation throughput in tokens/s",
                           registry=r)
        self.speed.set_function(self.speed_since_last_read)
        Gauge("localllm_slots", "Requests answered at once (1 on the localllm engine, PARALLEL on llama-server)",
              registry=r).set(slots)
        Gauge("localllm_max_queue", "Requests that may wait for a slot (MAX_QUEUE)", registry=r).set(max_queue)
        Gauge("localllm_info", "The engine and the served model", ["engine", "model"],
              registry=r).labels(engine, alias).set(1)
        for route in OPENAI_ROUTES:  # their series from the start: a dashboard shows 0, not "no data"
            self.first_token.labels(route)
            self.duration.labels(route)
        self.tokens_since, self.seconds_since = 0, 0.0

    def generated(self, tokens: int, seconds: float) -> None:
        """A streamed answer's tokens after the first, and the seconds they took."""
        self.tokens_since += tokens
        self.seconds_since += seconds

    def speed_since_last_read(self) -> float:
        """Generation tokens/s of the streamed answers since the last read, as llama-server's
        gauge is averaged since its last /metrics request."""
        speed = self.tokens_since / self.seconds_since if self.seconds_since > 0 else 0.0
        self.tokens_since, self.seconds_since = 0, 0.0
        return speed
