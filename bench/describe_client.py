"""The chat client's throughput against a loopback fake server with a fixed latency per request.

    python bench/describe_client.py                          # 2,000 prompts, 50 ms latency, concurrency 16
    python bench/describe_client.py --prompts 500 --sequential 50   # a quick run

Rates are answered requests per second: the client at ``--concurrency`` over ``--prompts`` prompts,
the same client at concurrency 1 (a sequential loop) over the first ``--sequential`` of them (its rate
does not depend on how many), their ratio (target >= 10x at 16), and the time of a full rerun served
from the answer cache (target < 2 s). The server is ``tests/describe/fake_chat_server.py``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import logging  # noqa: E402

from jaxgist.describe import AnswerCache, ChatSettings, Client, Request  # noqa: E402
from tests.describe.fake_chat_server import FakeChatServer  # noqa: E402


def prompts(n: int, tag: str) -> list[Request]:
    return [Request(f"{tag} {i}", [{"role": "user", "content": f"Describe class {i} ({tag}) in one line."}])
            for i in range(n)]


def timed_run(client: Client, requests: list[Request], desc: str) -> float:
    t0 = time.perf_counter()
    results = client.run(requests, desc=desc)
    elapsed = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{desc}: {len(failed)} requests failed, e.g. {failed[0]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--sequential", type=int, default=200, help="prompts of the sequential baseline")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request at the server")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)

    with FakeChatServer(latency_s=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        def settings(concurrency: int) -> ChatSettings:
            return ChatSettings(server.url, server.model, concurrency=concurrency)

        sequential = Client(settings(1))
        timed_run(sequential, prompts(3, "warm"), "warm-up")
        seq_s = timed_run(sequential, prompts(args.sequential, "sequential"), "sequential")

        cache_path = os.path.join(tmp, "answers.jsonl")
        concurrent = Client(settings(args.concurrency), AnswerCache(cache_path))
        timed_run(concurrent, prompts(args.concurrency, "warm"), "warm-up")
        server.reset_log()
        conc_s = timed_run(concurrent, prompts(args.prompts, "concurrent"), "concurrent")
        assert len(server.log) == args.prompts, len(server.log)

        server.reset_log()
        rerun_start = time.perf_counter()
        rerun = Client(settings(args.concurrency), AnswerCache(cache_path))  # loading the file is timed too
        results = rerun.run(prompts(args.prompts, "concurrent"), desc="rerun")
        rerun_s = time.perf_counter() - rerun_start
        assert server.log == [] and all(r.cached for r in results), "the rerun asked the server"

    seq_rate, conc_rate = args.sequential / seq_s, args.prompts / conc_s
    ideal = 1 / args.latency
    print(f"fake server: {args.latency * 1e3:.0f} ms per request (at most {ideal:.0f} requests/s sequentially)")
    print(f"sequential (concurrency 1, {args.sequential} prompts):  {seq_rate:8.1f} requests/s  ({seq_s:.2f} s)")
    print(f"concurrent (concurrency {args.concurrency}, {args.prompts} prompts): {conc_rate:8.1f} requests/s  "
          f"({conc_s:.2f} s; ideal {ideal * args.concurrency:.0f}/s)")
    print(f"speedup: {conc_rate / seq_rate:.1f}x (target >= 10x)")
    print(f"rerun from the cache ({args.prompts} prompts, cache loaded): {rerun_s:.3f} s (target < 2 s)")
    print(f"client stats: {concurrent.stats.summary()}")


if __name__ == "__main__":
    main()
