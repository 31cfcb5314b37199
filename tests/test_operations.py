"""Operating the endpoint, end to end on each engine with the real server and model:
/health across a start, /metrics counting exactly what the replies say, MAX_QUEUE's
503 under load with nothing in flight lost, request ids in replies and log lines,
LOG_FORMAT=json, and the Grafana dashboard's queries against a live /metrics."""
from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx2
import openai

from conftest import ALIAS, ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "localllm-dashboard.json"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)


def metrics(server) -> dict[str, float]:
    """Every sample of a live /metrics by name and labels, as Prometheus would scrape it."""
    reply = httpx2.get(server.url + "/metrics", timeout=10, trust_env=False)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain"), reply.text
    samples = {}
    for line in reply.text.splitlines():
        if line and not line.startswith("#"):
            name, labels, value = SAMPLE.match(line).groups()
            samples[name + (labels or "")] = float(value)
    return samples


def grew(before: dict, after: dict, sample: str) -> float:
    return after.get(sample, 0.0) - before.get(sample, 0.0)


def test_health_is_503_while_the_model_loads_then_200(start_server, engine, report):
    """The port answers from the first moment, 503 until the engine has its model."""
    entrypoint = start_server()
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not seen or seen[-1] != 200):
        try:
            reply = httpx2.get(entrypoint.url + "/health", timeout=5, trust_env=False)
        except httpx2.TransportError:
            time.sleep(0.02)  # the front is still starting
            continue
        if not seen or seen[-1] != reply.status_code:
            seen.append(reply.status_code)
            body = reply.json()
            assert body["status"] == ("ok" if reply.status_code == 200 else "loading"), body
        time.sleep(0.02)
    assert seen == [503, 200], (seen, entrypoint.output())
    body = httpx2.get(entrypoint.url + "/health", timeout=5, trust_env=False).json()
    assert body == {"status": "ok", "engine": engine, "model": ALIAS, "processing": 0, "waiting": 0}
    report(f"/health across a start ({engine})", " -> ".join(map(str, seen)))


def test_metrics_grow_by_exactly_the_tokens_of_a_request(server, engine, report):
    api = client(server)
    messages = [{"role": "user", "content": "Name three colours."}]
    before = metrics(server)
    reply = api.chat.completions.create(model=ALIAS, messages=messages, max_completion_tokens=12, temperature=0)
    after = metrics(server)
    assert grew(before, after, "localllm_prompt_tokens_total") == reply.usage.prompt_tokens
    assert grew(before, after, "llamacpp:tokens_predicted_total") == reply.usage.completion_tokens > 0
    route = '{route="/v1/chat/completions"'
    assert grew(before, after, 'localllm_requests_total' + route + ',status="200"}') == 1
    assert grew(before, after, "localllm_request_duration_seconds_count" + route + "}") == 1
    assert grew(before, after, "localllm_time_to_first_token_seconds_count" + route + "}") == 0  # not streamed

    # Streamed without usage: the client gets no usage event, the counters still grow by the
    # tokens the same request makes (temperature 0: the same answer as a stream with usage).
    chunks = list(api.chat.completions.create(model=ALIAS, messages=messages, max_completion_tokens=12,
                                              temperature=0, stream=True))
    assert all(chunk.choices for chunk in chunks) and all(chunk.usage is None for chunk in chunks)
    middle = metrics(server)
    counted = api.chat.completions.create(model=ALIAS, messages=messages, max_completion_tokens=12, temperature=0,
                                          stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in counted if chunk.usage][-1]
    last = metrics(server)
    assert grew(after, middle, "localllm_prompt_tokens_total") == usage.prompt_tokens
    assert grew(after, middle, "llamacpp:tokens_predicted_total") == usage.completion_tokens
    assert grew(middle, last, "llamacpp:tokens_predicted_total") == usage.completion_tokens
    assert grew(after, last, "localllm_time_to_first_token_seconds_count" + route + "}") == 2
    assert last["llamacpp:requests_processing"] == last["llamacpp:requests_deferred"] == 0
    excerpt = [line for line in httpx2.get(server.url + "/metrics", trust_env=False).text.splitlines()
               if line.startswith(("localllm_prompt", "llamacpp:", "localllm_requests_total"))]
    report(f"/metrics after 3 chat requests ({engine})", " | ".join(excerpt))


def test_beyond_max_queue_a_request_gets_503_at_once_and_none_in_flight_is_lost(start_server, engine, report):
    """One slot and MAX_QUEUE=1: of 5 streams sent at once, 2 are answered in full and 3
    get 503 with Retry-After and an OpenAI error body, before the first answer ends."""
    settings = {"MAX_QUEUE": "1"} | ({"PARALLEL": "1"} if engine == "llama-server" else {})
    entrypoint = start_server(**settings)
    entrypoint.wait_ready()
    body = {"model": ALIAS, "prompt": "Once upon a time", "max_tokens": 48, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}

    def send(_) -> tuple[int, float, dict, str]:
        with httpx2.stream("POST", entrypoint.url + "/v1/completions", json=body, timeout=120,
                           trust_env=False) as reply:
            text = reply.read().decode()
        return reply.status_code, time.monotonic(), dict(reply.headers), text

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(send, range(5)))
    answered = [r for r in replies if r[0] == 200]
    refused = [r for r in replies if r[0] == 503]
    assert (len(answered), len(refused)) == (2, 3), [(r[0], r[3][:200]) for r in replies]
    for _, _, _, text in answered:  # whole: every token, the end, the usage
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
        assert finish[-1] in ("length", "stop") and text.rstrip().endswith("data: [DONE]")
        assert events[-1]["usage"]["completion_tokens"] >= sum(bool(e["choices"] and e["choices"][0]["text"])
                                                               for e in events) > 0
    for _, _, headers, text in refused:
        assert int(headers["retry-after"]) >= 1
        error = json.loads(text)["error"]
        assert error["code"] == "queue_full" and "MAX_QUEUE=1" in error["message"], error
    assert max(r[1] for r in refused) < min(r[1] for r in answered)  # at once, not after a wait in line
    assert metrics(entrypoint)["localllm_requests_rejected_total"] == 3
    report(f"MAX_QUEUE=1, one slot, 5 streams at once ({engine})",
           f"2 answered in full, 3 refused at once: {json.loads(refused[0][3])['error']['message']}")


def test_the_request_id_is_echoed_and_on_its_log_line(server):
    given = httpx2.get(server.url + "/v1/models", headers={"X-Request-Id": "job-42.step_7"}, trust_env=False)
    assert given.headers["x-request-id"] == "job-42.step_7"
    line = server.wait_for_line("request_id=job-42.step_7")
    assert '"GET /v1/models" 200' in line
    made = client(server).chat.completions.with_raw_response.create(
        model=ALIAS, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=2)
    made_id = made.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made_id)
    assert '"POST /v1/chat/completions" 200' in server.wait_for_line(f"request_id={made_id}")
    forged = httpx2.get(server.url + "/v1/models", headers={"X-Request-Id": "x\" status=500"}, trust_env=False)
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["x-request-id"])  # not written to the log as given


def test_log_format_json_makes_every_line_one_object(start_server, engine):
    entrypoint = start_server(LOG_FORMAT="json")
    entrypoint.wait_ready()
    reply = client(entrypoint).completions.with_raw_response.create(model=ALIAS, prompt="Hi", max_tokens=2)
    rid = reply.headers["x-request-id"]
    entrypoint.wait_for_line(rid)
    entrypoint.close()
    entrypoint.wait_for_line("stopped on SIGTERM")
    objects = [json.loads(line) for line in entrypoint.lines]  # every line, from the first to the last
    assert all({"time", "level", "message"} <= set(o) for o in objects)
    access = [o for o in objects if o.get("request_id") == rid]
    assert access and access[-1]["status"] == 200 and access[-1]["path"] == "/v1/completions"
    assert any(o["message"].startswith("Serving ") for o in objects)
    assert any(o["message"].startswith("stopped on SIGTERM") for o in objects)


def test_every_metric_the_dashboard_queries_is_in_a_live_metrics(server):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(queries) >= 8
    live = {re.sub(r"_(bucket|count|sum)$", "", key.split("{")[0]) for key in metrics(server)}
    live |= {key.split("{")[0] for key in metrics(server)}
    used = {name for query in queries for name in re.findall(r"(?:localllm_|llamacpp:)[a-z_:]+", query)}
    assert used and used <= live, used - live
