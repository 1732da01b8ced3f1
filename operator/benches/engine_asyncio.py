"""The peer of `make bench-engine`: the same fan-out written the way people write it
today, Python asyncio with the official openai client, a semaphore for the concurrency.

Prints one JSON line: {"calls": N, "seconds": S, "sequential_ms": M}.
"""

import argparse
import asyncio
import json
import time

from openai import AsyncOpenAI


async def fan_out(client, model, calls, concurrency):
    gate = asyncio.Semaphore(concurrency)

    async def subagent(i):
        async with gate:
            response = await client.chat.completions.create(
                model=model,
                messages=[
                    {"role": "system", "content": "Describe a colour."},
                    {"role": "user", "content": f"subtask {i}"},
                ],
                max_completion_tokens=64,
                temperature=0.7,
            )
            return response.choices[0].message.content, response.usage.total_tokens

    results = await asyncio.gather(*(subagent(i) for i in range(calls)))
    return sum(tokens for _, tokens in results)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="m")
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--sequential-calls", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args()
    client = AsyncOpenAI(base_url=args.url, api_key="bench", max_retries=2, timeout=30)
    await fan_out(client, args.model, 50, args.concurrency)  # warm the connection pool
    start = time.perf_counter()
    await fan_out(client, args.model, args.calls, args.concurrency)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    await fan_out(client, args.model, args.sequential_calls, 1)
    sequential = (time.perf_counter() - start) / args.sequential_calls
    print(json.dumps({"calls": args.calls, "seconds": seconds, "sequential_ms": sequential * 1e3}))


asyncio.run(main())
