#!/usr/bin/env python3
"""The fake LLM's ceiling on this machine: a bare HTTP client that only makes the bench flow's chat calls.

usage: python bench/bare_client.py URL [--lines 2000] [--in-flight 128]

Makes `--lines` non-streamed chat calls to URL (the fake LLM's base URL), `--in-flight` at a time over one
keep-alive connection pool, reads each answer and does nothing else; prints {"wall_s", "lines_per_s"} as JSON.
No batch run can be faster than this against the same server on the same machine: the gap between the two is
what the studio adds, and the gap between this and in flight ÷ call latency is the harness's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def measure(url: str, lines: int, in_flight: int) -> dict[str, float]:
    slots = asyncio.Semaphore(in_flight)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bare-client"}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def call(number: int) -> None:
            body = {
                "model": "mock-gpt",
                "max_tokens": 64,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"question {number}?"}],
            }
            async with slots, session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
                resp.raise_for_status()
                await resp.read()

        await call(-1)  # the connection pool's first connection, as warmed-up workers have theirs
        started = time.perf_counter()
        await asyncio.gather(*(call(n) for n in range(lines)))
        wall = time.perf_counter() - started
    return {"wall_s": round(wall, 3), "lines_per_s": round(lines / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=128)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(measure(args.url.rstrip("/"), args.lines, args.in_flight))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
