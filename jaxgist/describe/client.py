"""Many prompts asked of an OpenAI-compatible chat endpoint (hosted API, vLLM, Ollama, llama.cpp server).

    settings = ChatSettings(base_url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct")
    client = Client(settings, AnswerCache(workdir / "answers.jsonl"))
    results = client.run([Request("class 3 / description 7", messages, validate=parse)], desc="descriptions")
    values = [r.value for r in results if r.ok]; logging.info(client.stats.summary())

Requests whose answer is in the cache are served from it, identical requests (same cache key) are asked
once, the rest run on ``concurrency`` threads. Each is retried with exponential backoff (jittered, capped,
``Retry-After`` honored) on 429, 5xx, timeouts, lost connections, malformed bodies, empty answers,
refusals (:func:`is_refusal`) and answers that ``validate`` rejects with :class:`BadAnswer`; after
``max_retries`` it fails (``Result.ok`` False, ``Result.error`` says why) and the others go on. An
endpoint that cannot be reached, rejects the key or does not know the model raises one
:class:`EndpointError` naming the URL, fast. Only validated answers reach the cache, each as it arrives.
"""

from __future__ import annotations

import dataclasses
import email.utils
import os
import queue
import random
import re
import socket
import threading
import time
from typing import Any, Callable, Sequence

import openai
from absl import logging

from jaxgist.describe.cache import AnswerCache, cache_key

RETRY_KINDS = ("429", "5xx", "timeout", "connection", "malformed", "empty", "refused", "invalid")


class BadAnswer(ValueError):
    """An answer that is empty, refused or unparsable: raised by ``validate`` to have it asked again."""


class EndpointError(RuntimeError):
    """The endpoint cannot be used at all: unreachable, wrong base_url, key rejected, model unknown."""


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    """Where to ask and how. The API key is read from ``$api_key_env``; a local server needs none."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    seed: int | None = None  # sent where given
    timeout_s: float = 60.0  # per request
    max_retries: int = 5  # after the first attempt
    concurrency: int = 16  # requests in flight at most
    backoff_s: float = 1.0  # retry r waits about backoff_s * 2**(r-1), jittered down to half
    max_backoff_s: float = 60.0

    def __post_init__(self):
        for name in ("timeout_s", "backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ChatSettings.{name} must be > 0, got {getattr(self, name)!r}")
        if self.concurrency < 1 or self.max_retries < 0 or self.max_tokens < 1:
            raise ValueError(f"ChatSettings needs concurrency >= 1, max_retries >= 0, max_tokens >= 1: {self}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"ChatSettings.base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                             f"got {self.base_url!r} (describe.base_url)")


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt. ``messages`` are chat messages; a content may be a string or a list of parts
    (``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": "data:..."}}``).
    ``validate(text)`` returns what the caller gets or raises :class:`BadAnswer`; any other exception
    is a bug and stops the run. None fields take the client's settings."""

    key: str
    messages: list[dict]
    validate: Callable[[str], Any] | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Result:
    """The answer to one request: ``value`` (validated; None when not ok), ``text`` (the raw answer,
    for a failed request the last one received, if any), ``cached`` (served from the cache)."""

    key: str
    value: Any
    text: str | None
    ok: bool
    error: str | None
    cached: bool


@dataclasses.dataclass
class Stats:
    """Counts over the client's life: HTTP requests sent, answers accepted, cache hits, retries by kind,
    failed requests, tokens from the servers' ``usage``."""

    requests: int = 0
    answers: int = 0
    cached: int = 0
    retries: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(RETRY_KINDS, 0))
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def summary(self) -> str:
        retried = ", ".join(f"{kind} {n}" for kind, n in self.retries.items() if n) or "none"
        return (f"{self.requests} requests sent, {self.answers} answers, {self.cached} from the cache, "
                f"{self.failed} failed; retries: {retried}; tokens: {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion")


# An answer that opens like this and is short is a refusal (a small heuristic, lower-cased, ’ read as ').
REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry, (?:but )?i|i apologi[sz]e|unfortunately, i can|as an ai\b"
    r"|i (?:can(?:no|')?t|can not|won'?t|will not|am unable to|'?m unable to|am not able to|'?m not able to)"
    r" (?:help|assist|provide|comply|fulfil|do that|answer|describe|generate|create|write|identify|share"
    r"|support|engage|continue))")
REFUSAL_MAX_CHARS = 300


def is_refusal(text: str) -> bool:
    """True for a short answer that opens with a refusal ("I'm sorry, I can't ...", "I cannot help ...")."""
    head = text.strip().lower().replace("\u2019", "'")
    return len(head) <= REFUSAL_MAX_CHARS and REFUSAL.match(head) is not None


class _Retry(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None, text: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.retry_after, self.text = kind, message, retry_after, text


class _Failure(Exception):
    """This request cannot succeed (e.g. HTTP 400): failed without retries."""


def retry_after_s(headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            continue
        return max(0.0, when.timestamp() - time.time())
    return None


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _connect_failure(error: BaseException) -> str | None:
    """Why no connection could be opened (refused, name unknown, connect timeout), or None when the
    failure came after connecting (a reset: the server is there)."""
    for e in _chain(error):
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"host name not resolved: {e}"
        if type(e).__name__ == "ConnectTimeout":
            return "no connection within the timeout"
    for e in _chain(error):
        if type(e).__name__ == "ConnectError":
            return str(e) or "connect error"
    return None


def _server_message(error: openai.APIStatusError) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return str(message)[:300]
    try:
        return error.response.text[:300]
    except Exception:
        return str(error)[:300]


class _Progress:
    """A progress line at most every ``every_s`` seconds (and at the end)."""

    def __init__(self, desc: str, total: int, done: int, stats: Stats, every_s: float):
        self.desc, self.total, self.done, self.stats, self.every_s = desc, total, done, stats, every_s
        self.asked = 0
        self.t0 = self.last = time.monotonic()
        self.retries0, self.failed0 = sum(stats.retries.values()), stats.failed

    def wait_s(self) -> float:
        return max(0.05, self.every_s - (time.monotonic() - self.last))

    def log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.asked / max(now - self.t0, 1e-9)
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 else ("0 s" if left == 0 else "?")
        logging.info("%s: %d/%d done, %.1f/s, ETA %s, %d retries, %d failed", self.desc, self.done, self.total,
                     rate, eta, sum(self.stats.retries.values()) - self.retries0, self.stats.failed - self.failed0)


class Client:
    """Asks :class:`Request` s of one endpoint; see the module docstring. Not reentrant: one ``run`` at a time."""

    PROGRESS_EVERY_S = 10.0
    DOWN_AFTER = 3  # connections that fail to open before the server ever answered: it is not there
    FAST_RETRY_S = 0.2  # the backoff of those (so that a down server is reported in well under a second)
    MAX_RETRY_AFTER_S = 600.0  # a guard against absurd Retry-After values

    def __init__(self, settings: ChatSettings, cache: AnswerCache | None = None):
        self.settings = settings
        self.cache = cache
        self.stats = Stats()
        self._openai = openai.OpenAI(base_url=settings.base_url, api_key=os.environ.get(settings.api_key_env) or "none",
                                     timeout=settings.timeout_s, max_retries=0)
        self._lock = threading.Lock()
        self._reached = False  # some HTTP response came back from the server
        self._unreachable = 0  # connections that failed to open while not _reached
        self._pause_until = 0.0  # monotonic time before which nothing is sent (a Retry-After)

    def close(self) -> None:
        self._openai.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cache_key(self, request: Request) -> str:
        """The request's cache key: model, messages and sampling parameters."""
        temperature, max_tokens, seed = self._sampling(request)
        return cache_key(self.settings.model, request.messages, temperature=temperature, max_tokens=max_tokens,
                         seed=seed)

    def _sampling(self, request: Request) -> tuple[float, int, int | None]:
        s = self.settings
        return (s.temperature if request.temperature is None else request.temperature,
                s.max_tokens if request.max_tokens is None else request.max_tokens,
                s.seed if request.seed is None else request.seed)

    # ------------------------------------------------------------------------------------------ run

    def run(self, requests: Sequence[Request], *, desc: str = "describe") -> list[Result]:
        """Answers to ``requests``, in their order. Raises :class:`EndpointError` when the endpoint cannot be
        used; a request that keeps failing is a Result with ``ok`` False."""
        requests = list(requests)
        results: list[Result | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # cache key -> indices of identical requests still to ask
        for i, request in enumerate(requests):
            h = self.cache_key(request)
            text = self.cache.get(h) if self.cache is not None else None
            if text is not None:
                try:
                    value = _validated(request, text)
                except BadAnswer:
                    pass  # the validator changed since: ask again
                else:
                    results[i] = Result(request.key, value, text, True, None, True)
                    with self._lock:
                        self.stats.cached += 1
                    continue
            groups.setdefault(h, []).append(i)
        to_ask = sum(len(g) for g in groups.values())
        progress = _Progress(desc, len(requests), len(requests) - to_ask, self.stats, self.PROGRESS_EVERY_S)
        logging.info("%s: %d requests, %d from the cache, %d distinct to ask of %s at %s (concurrency %d)", desc,
                     len(requests), len(requests) - to_ask, len(groups), self.settings.model, self.settings.base_url,
                     self.settings.concurrency)
        if groups:
            self._ask_all(requests, groups, results, progress)
        progress.log(force=True)
        return results  # type: ignore[return-value]

    def _ask_all(self, requests, groups, results, progress) -> None:
        tasks: queue.Queue = queue.Queue()
        for item in groups.items():
            tasks.put(item)
        outcomes: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work():
            while not stop.is_set():
                try:
                    h, indices = tasks.get_nowait()
                except queue.Empty:
                    return
                try:
                    outcome = self._ask(requests[indices[0]], h, stop)
                except BaseException as e:  # EndpointError, a validator's bug: the main thread raises it
                    stop.set()
                    outcome = e
                outcomes.put((indices, outcome))

        threads = [threading.Thread(target=work, name=f"describe-{i}", daemon=True)
                   for i in range(min(self.settings.concurrency, len(groups)))]
        for t in threads:
            t.start()
        remaining = len(groups)
        try:
            while remaining:
                try:
                    indices, outcome = outcomes.get(timeout=progress.wait_s())
                except queue.Empty:
                    progress.log()
                    continue
                remaining -= 1
                if isinstance(outcome, BaseException):
                    raise outcome
                for i, result in zip(indices, self._share(requests, indices, *outcome)):
                    results[i] = result
                progress.done += len(indices)
                progress.asked += len(indices)
                progress.log()
        finally:
            stop.set()  # on an error, the workers stop after their request in flight (daemon threads)
        for t in threads:
            t.join()

    @staticmethod
    def _share(requests, indices, value, text, error) -> list[Result]:
        """Results of identical requests asked once: each gets its own validator's value."""
        first = requests[indices[0]]
        out = [Result(first.key, value, text, error is None, error, False)]
        for i in indices[1:]:
            request = requests[i]
            if error is not None or request.validate is first.validate:
                out.append(Result(request.key, value, text, error is None, error, False))
                continue
            try:
                out.append(Result(request.key, _validated(request, text), text, True, None, False))
            except BadAnswer as e:
                out.append(Result(request.key, None, text, False, f"invalid: {e}", False))
        return out

    # ------------------------------------------------------------------------------------ one request

    def _ask(self, request: Request, h: str, stop: threading.Event) -> tuple[Any, str | None, str | None]:
        """(value, text, error) of one request, retried; the accepted answer is cached before returning."""
        s = self.settings
        temperature, max_tokens, seed = self._sampling(request)
        kwargs: dict[str, Any] = dict(model=s.model, messages=request.messages, temperature=temperature,
                                      max_tokens=max_tokens)
        if seed is not None:
            kwargs["seed"] = seed
        last: _Retry | None = None
        last_text = None
        for attempt in range(s.max_retries + 1):
            if stop.wait(self._delay(attempt, last) if attempt else 0):
                return None, last_text, "stopped"
            while (pause := self._pause_until - time.monotonic()) > 0:
                if stop.wait(pause):
                    return None, last_text, "stopped"
            try:
                text = self._send(kwargs)
                value = self._accept(request, text)
            except _Retry as e:
                last, last_text = e, e.text if e.text is not None else last_text
                if e.retry_after is not None:
                    with self._lock:
                        self._pause_until = max(self._pause_until, time.monotonic() + self._retry_after_delay(e))
                if attempt < s.max_retries:
                    with self._lock:
                        self.stats.retries[e.kind] += 1
                continue
            except _Failure as e:
                with self._lock:
                    self.stats.failed += 1
                return None, last_text, str(e)
            if self.cache is not None:
                self.cache.put(h, text, {"key": request.key, "model": s.model, "time": round(time.time(), 3)})
            with self._lock:
                self.stats.answers += 1
            return value, text, None
        with self._lock:
            self.stats.failed += 1
        return None, last_text, f"{last.kind}: {last.message} (failed {s.max_retries + 1} times)"

    def _retry_after_delay(self, error: _Retry) -> float:
        # honored as given (max_backoff_s does not cap it), up to MAX_RETRY_AFTER_S, plus up to 10% jitter
        return min(error.retry_after, self.MAX_RETRY_AFTER_S) * random.uniform(1.0, 1.1)

    def _delay(self, attempt: int, error: _Retry) -> float:
        s = self.settings
        if error.retry_after is not None:
            return self._retry_after_delay(error)
        delay = min(s.max_backoff_s, s.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        if error.kind == "connection" and not self._reached:
            delay = min(delay, self.FAST_RETRY_S)
        return delay

    def _send(self, kwargs: dict) -> str | None:
        """The answer text of one HTTP request (None when the server sent none); raises _Retry, _Failure,
        EndpointError."""
        s = self.settings
        with self._lock:
            self.stats.requests += 1
        try:
            completion = self._openai.chat.completions.create(**kwargs)
        except openai.APIStatusError as e:
            self._reached = True
            self._raise_for_status(e)
        except openai.APIConnectionError as e:  # APITimeoutError included
            reason = _connect_failure(e)
            if reason is not None:
                with self._lock:
                    if not self._reached:
                        self._unreachable += 1
                        if self._unreachable >= self.DOWN_AFTER:
                            raise EndpointError(f"cannot reach the chat endpoint {s.base_url} ({reason}): is the "
                                                "server running? (describe.base_url)") from None
                raise _Retry("connection", f"{reason} ({s.base_url})")
            if isinstance(e, openai.APITimeoutError):
                raise _Retry("timeout", f"no answer within {s.timeout_s} s (describe.timeout_s)")
            detail = next((str(c) for c in _chain(e) if c is not e and str(c)), str(e))
            raise _Retry("connection", f"connection lost: {detail}")
        except ValueError as e:  # a body that is not JSON
            self._reached = True
            raise _Retry("malformed", f"the answer body is not JSON: {e}")
        self._reached = True
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise _Retry("malformed", "the answer has no choices")
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        usage = getattr(completion, "usage", None)
        prompt_tokens, completion_tokens = getattr(usage, "prompt_tokens", 0), getattr(usage, "completion_tokens", 0)
        with self._lock:
            self.stats.prompt_tokens += prompt_tokens if isinstance(prompt_tokens, int) else 0
            self.stats.completion_tokens += completion_tokens if isinstance(completion_tokens, int) else 0
        if content is not None and not isinstance(content, str):
            raise _Retry("malformed", f"the answer's content is a {type(content).__name__}, not a string")
        if getattr(choices[0], "finish_reason", None) == "content_filter" or getattr(message, "refusal", None):
            raise _Retry("refused", f"refused ({getattr(message, 'refusal', None) or 'content_filter'})", text=content)
        return content

    def _raise_for_status(self, e: openai.APIStatusError):
        s, status = self.settings, e.status_code
        where = f"the chat endpoint {s.base_url}"
        message = _server_message(e)
        if status in (401, 403):
            raise EndpointError(f"{where} rejected the API key (HTTP {status}: {message}): set ${s.api_key_env} "
                                "(describe.api_key_env)") from None
        if status == 404:
            raise EndpointError(f"{where} answered HTTP 404 ({message}) for model {s.model!r}: check "
                                "describe.base_url (usually ending in /v1) and describe.model") from None
        if status == 429:
            raise _Retry("429", f"rate limited: {message}", retry_after_s(e.response.headers))
        if status >= 500:
            raise _Retry("5xx", f"HTTP {status}: {message}", retry_after_s(e.response.headers))
        if status == 408:
            raise _Retry("timeout", f"HTTP 408: {message}")
        raise _Failure(f"HTTP {status}: {message}")

    def _accept(self, request: Request, text: str | None) -> Any:
        if text is None or not text.strip():
            raise _Retry("empty", "empty answer", text=text)
        if is_refusal(text):
            raise _Retry("refused", f"refusal: {text[:80]!r}", text=text)
        try:
            return _validated(request, text)
        except BadAnswer as e:
            raise _Retry("invalid", f"rejected by validate: {e}", text=text) from None


def _validated(request: Request, text: str) -> Any:
    if request.validate is None:
        return text
    try:
        return request.validate(text)
    except BadAnswer:
        raise
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"(in validate of the answer to request {request.key!r}; raise BadAnswer to have the "
                       "answer asked again)")
        raise
