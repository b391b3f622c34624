"""The chat client against a real loopback server: faults retried, Retry-After honored, failures counted,
a down or wrong endpoint reported fast, answers cached across runs (a killed run included), concurrency."""

import email.utils
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from jaxgist.describe import AnswerCache, BadAnswer, ChatSettings, Client, EndpointError, Request, is_refusal
from jaxgist.describe.client import retry_after_s
from tests.describe.fake_chat_server import FakeChatServer

REPO = pathlib.Path(__file__).resolve().parents[2]


def settings(server_or_url, **overrides) -> ChatSettings:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
    kw = dict(base_url=url, model="fake-model", backoff_s=0.01, max_backoff_s=0.05, timeout_s=5.0, max_retries=3,
              concurrency=4)
    return ChatSettings(**{**kw, **overrides})


def requests(n: int, prefix: str = "prompt") -> list[Request]:
    return [Request(f"{prefix} {i}", [{"role": "user", "content": f"{prefix} number {i}"}]) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RETRY_KIND = {"429": "429", "503": "5xx", "500": "5xx", "hang": "timeout", "reset": "connection",
              "malformed": "malformed", "empty": "empty", "refusal": "refused", "content_filter": "refused"}


@pytest.mark.parametrize("fault", sorted(RETRY_KIND))
def test_each_fault_is_retried_and_the_answers_are_right(server, fault):
    server.hang_s = 3.0
    server.fault(fault)
    client = Client(settings(server, timeout_s=0.5, concurrency=1))
    reqs = requests(3)
    results = client.run(reqs)
    assert [r.key for r in results] == [r.key for r in reqs]
    assert all(r.ok and not r.cached and r.error is None for r in results), results
    assert [r.value for r in results] == [server.expected(f"prompt number {i}") for i in range(3)]
    assert [r.text for r in results] == [r.value for r in results]
    assert server.log == ["prompt number 0"] * 2 + ["prompt number 1", "prompt number 2"]
    expected_retries = dict.fromkeys(client.stats.retries, 0) | {RETRY_KIND[fault]: 1}
    assert client.stats.retries == expected_retries
    assert (client.stats.requests, client.stats.answers, client.stats.failed) == (4, 3, 0)


@pytest.mark.parametrize("header", ["1", "date"])
def test_retry_after_is_honored(server, header):
    value = email.utils.formatdate(time.time() + 2, usegmt=True) if header == "date" else header
    server.fault(f"429:{value}")
    client = Client(settings(server, backoff_s=0.01))
    t0 = time.monotonic()
    [result] = client.run(requests(1))
    elapsed = time.monotonic() - t0
    assert result.ok and client.stats.retries["429"] == 1
    assert 0.95 <= elapsed < 3.5, elapsed  # an HTTP date has whole seconds: 1 to 2 s from now


def test_retry_after_parsing():
    assert retry_after_s({"retry-after": "1.5"}) == 1.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 8 <= retry_after_s({"retry-after": email.utils.formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert retry_after_s({"retry-after": email.utils.formatdate(time.time() - 10, usegmt=True)}) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None


def test_a_request_that_keeps_failing_is_counted_failed_and_the_others_succeed(server):
    server.fault_for("number 2", *["500"] * 10)
    client = Client(settings(server, max_retries=3))
    results = client.run(requests(5))
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert results[2].value is None and "5xx" in results[2].error and "HTTP 500" in results[2].error
    assert server.log.count("prompt number 2") == 4  # the first attempt and 3 retries
    assert client.stats.failed == 1 and client.stats.retries["5xx"] == 3 and client.stats.answers == 4
    assert [r.value for r in results if r.ok] == [server.expected(f"prompt number {i}") for i in (0, 1, 3, 4)]


def test_invalid_answers_are_retried_and_a_validator_bug_stops_the_run(server):
    calls = []

    def flaky(prompt):
        calls.append(prompt)
        return "no json here" if len(calls) == 1 else json.dumps([prompt.upper()])

    server.answer = flaky

    def parse(text):
        try:
            return json.loads(text)
        except ValueError as e:
            raise BadAnswer(str(e)) from None

    client = Client(settings(server, concurrency=1))
    [result] = client.run([Request("k", [{"role": "user", "content": "hello"}], validate=parse)])
    assert result.ok and result.value == ["HELLO"] and client.stats.retries["invalid"] == 1
    with pytest.raises(ZeroDivisionError):
        client.run([Request("k2", [{"role": "user", "content": "bug"}], validate=lambda text: 1 / 0)])


def test_a_down_server_is_one_endpoint_error_naming_the_url_quickly():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = Client(settings(url, concurrency=16, backoff_s=1.0, max_retries=5))
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match="cannot reach the chat endpoint .*connection refused") as info:
        client.run(requests(40))
    assert url in str(info.value) and "describe.base_url" in str(info.value)
    assert time.monotonic() - t0 < 3.0
    assert client.stats.requests <= 16 + Client.DOWN_AFTER  # not 40 requests times 6 attempts


def test_a_single_request_to_a_down_server_fails_fast_too():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=url):
        Client(settings(url, backoff_s=2.0)).run(requests(1))
    assert time.monotonic() - t0 < 3.0


def test_wrong_base_url_model_or_key_is_one_endpoint_error(server):
    with urllib.request.urlopen(server.url + "/models", timeout=5) as answer:  # the fake server's model list
        assert json.load(answer)["data"][0]["id"] == "fake-model"
    root = server.url.removesuffix("/v1")
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=f"{root} answered HTTP 404.*describe.base_url"):
        Client(settings(root)).run(requests(8))
    assert time.monotonic() - t0 < 3.0
    with pytest.raises(EndpointError, match="404.*'no-such-model'.*describe.model"):
        Client(settings(server, model="no-such-model")).run(requests(8))
    server.api_key = "sesame"
    with pytest.raises(EndpointError, match=r"rejected the API key \(HTTP 401.*\$JAXGIST_TEST_KEY"):
        Client(settings(server, api_key_env="JAXGIST_TEST_KEY")).run(requests(8))
    os.environ["JAXGIST_TEST_KEY"] = "sesame"
    try:
        assert all(r.ok for r in Client(settings(server, api_key_env="JAXGIST_TEST_KEY")).run(requests(2)))
    finally:
        del os.environ["JAXGIST_TEST_KEY"]


def test_a_second_run_is_served_from_the_cache(server, tmp_path):
    path = tmp_path / "answers.jsonl"
    first = Client(settings(server), AnswerCache(path)).run(requests(20))
    assert len(server.log) == 20 and len(path.read_text().splitlines()) == 20
    server.reset_log()
    client = Client(settings(server), AnswerCache(path))
    second = client.run(requests(20))
    assert server.log == []
    assert [(r.key, r.value, r.text, r.ok) for r in second] == [(r.key, r.value, r.text, r.ok) for r in first]
    assert all(r.cached for r in second) and client.stats.cached == 20 and client.stats.requests == 0
    # other sampling parameters are other answers
    Client(settings(server, temperature=0.7), AnswerCache(path)).run(requests(2))
    assert len(server.log) == 2


def test_identical_requests_are_asked_once(server):
    reqs = requests(3) + requests(3)
    results = Client(settings(server)).run(reqs)
    assert sorted(server.log) == [f"prompt number {i}" for i in range(3)]
    assert [r.value for r in results[:3]] == [r.value for r in results[3:]] and all(r.ok for r in results)


def test_sampling_parameters_are_sent(server):
    client = Client(settings(server, temperature=0.3, max_tokens=64, seed=7, concurrency=1))
    client.run([Request("a", [{"role": "user", "content": "a"}]),
                Request("b", [{"role": "user", "content": "b"}], temperature=0.9, max_tokens=8, seed=1)])
    assert [(b["temperature"], b["max_tokens"], b["seed"]) for b in server.bodies] == [(0.3, 64, 7), (0.9, 8, 1)]
    Client(settings(server, concurrency=1)).run(requests(1))
    assert "seed" not in server.bodies[-1]


KILLED_RUN = textwrap.dedent("""
    import sys
    from jaxgist.describe import AnswerCache, ChatSettings, Client, Request
    url, path, n, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    requests = [Request(f"prompt {i}", [{"role": "user", "content": f"prompt number {i}"}]) for i in range(n)]
    Client(ChatSettings(url, "fake-model", concurrency=concurrency), AnswerCache(path)).run(requests)
""")


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_killed_run_resumes_without_asking_again(tmp_path, concurrency):
    n, kill_at = 40, 12
    path = tmp_path / "answers.jsonl"
    proc = {}

    def kill(index, prompt):
        if index == kill_at:
            os.kill(proc["p"].pid, signal.SIGKILL)

    with FakeChatServer(latency_s=0.02, on_request=kill) as server:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc["p"] = subprocess.Popen([sys.executable, "-c", KILLED_RUN, server.url, str(path), str(n),
                                      str(concurrency)], env=env, cwd=REPO)
        assert proc["p"].wait(timeout=60) == -signal.SIGKILL
        time.sleep(0.1)  # answers in flight when the client died
        before = list(server.answered)
        cached = {json.loads(line)["text"] for line in path.read_text().splitlines()}
        assert kill_at - concurrency <= len(cached) <= kill_at and len(before) <= kill_at + concurrency
        server.on_request = None
        server.reset_log()
        results = Client(settings(server), AnswerCache(path)).run(requests(n))
        asked_again = set(server.log) & set(before)
        assert not {server.expected(p) for p in asked_again} & cached  # nothing received and cached is asked
        assert len(server.log) == len(set(server.log))
        if concurrency == 1:  # each answer is cached before the next request: exactly the rest is asked
            # the request the client died on may have been answered (never cached) before the kill landed
            assert sorted(server.log) == sorted(f"prompt number {i}" for i in range(kill_at, n))
            assert not asked_again - {f"prompt number {kill_at}"}
        assert len(asked_again) < concurrency
        uninterrupted = Client(settings(server)).run(requests(n))
    assert [(r.key, r.value, r.ok) for r in results] == [(r.key, r.value, r.ok) for r in uninterrupted]


def test_a_truncated_last_cache_line_is_tolerated(server, tmp_path):
    path = tmp_path / "answers.jsonl"
    Client(settings(server), AnswerCache(path)).run(requests(3))
    with open(path, "a") as f:
        f.write('{"hash": "abc", "text": "half an ans')
    cache = AnswerCache(path)
    assert cache.truncated == 1 and len(cache) == 3
    server.reset_log()
    results = Client(settings(server), cache).run(requests(4))
    assert server.log == ["prompt number 3"] and all(r.ok for r in results)
    assert AnswerCache(path).truncated == 0 and len(AnswerCache(path)) == 4


def test_a_malformed_cache_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"hash": "a", "text": "x"}\nnot json\n{"hash": "b", "text": "y"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: malformed"):
        AnswerCache(path)


def test_usage_tokens_are_summed(server):
    client = Client(settings(server))
    client.run(requests(10))
    prompts = [f"prompt number {i}" for i in range(10)]
    assert client.stats.prompt_tokens == sum(len(p.split()) for p in prompts)
    assert client.stats.completion_tokens == sum(len(server.expected(p).split()) for p in prompts)
    assert "10 requests sent, 10 answers" in client.stats.summary()


def test_requests_overlap_up_to_the_concurrency():
    with FakeChatServer(latency_s=0.05) as server:
        client = Client(settings(server, concurrency=16))
        client.run(requests(4, "warm"))  # connections opened
        t0 = time.monotonic()
        results = client.run(requests(32))
        elapsed = time.monotonic() - t0
    assert all(r.ok for r in results)
    assert elapsed < 0.5 * 32 * 0.05, elapsed  # sequential would be 1.6 s; 16 at a time about 0.1 s
    assert 8 <= server.max_in_flight <= 16  # overlapping, never more than the concurrency


def test_progress_is_logged(server, caplog):
    client = Client(settings(server))
    client.PROGRESS_EVERY_S = 0.0
    with caplog.at_level("INFO"):
        client.run(requests(5), desc="descriptions")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("descriptions: ")]
    assert any("5/5 done" in line and "/s, ETA" in line and "0 failed" in line for line in lines), lines


def test_refusal_heuristic():
    for text in ["I'm sorry, I can't help with that.", "I cannot help with this request.", "Sorry, but I can't",
                 "I am unable to describe this image.", "I\u2019m sorry, but I cannot provide that.",
                 "As an AI, I cannot identify people."]:
        assert is_refusal(text), text
    for text in ["It has a red crest.", "Iridescent green feathers cover the back.",
                 "I can see a small bird with a red crest.", "I'm sorry " + "x" * 400]:
        assert not is_refusal(text), text
