"""The same job as data_generator's, written the way users write it by hand with the official
Python clients: `ollama.AsyncClient` or `openai.AsyncOpenAI`, an asyncio semaphore for the
requests in flight, every reply streamed and accumulated, one JSON line written per finished
record. `cargo bench` (benches/throughput.rs) runs it in its own virtualenv against the same fake
server and rows, and prints its figures beside data_generator's.

    python python_clients.py --kind ollama|openai --url URL --rows rows.jsonl --concurrency N --out out.jsonl

Prints one JSON object: requests, tokens (the servers' completion counts), secs (wall), cpu_secs
(user + system of this process, the loop only: imports and interpreter start are left out, which
favours Python), peak_kb (peak resident memory).
"""

import argparse
import asyncio
import json
import resource
import time


def cpu_secs():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


async def run(rows, concurrency, out, reply):
    """The loop users write: at most `concurrency` replies at once, each streamed by
    `reply(row)` into (text, completion tokens), one JSON line written per record."""
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(row):
        nonlocal tokens
        async with sem:
            text, n = await reply(row)
            tokens += n
            out.write(json.dumps({"id": row["id"], "prompt": row["question"], "response": text}) + "\n")
            out.flush()

    await asyncio.gather(*(one(r) for r in rows))
    return tokens


def ollama_reply(url):
    from ollama import AsyncClient

    client = AsyncClient(host=url)

    async def reply(row):
        parts, last = [], None
        stream = await client.chat(
            model="fake-model",
            messages=[{"role": "user", "content": row["question"]}],
            stream=True,
            options={"seed": 1},
        )
        async for part in stream:
            parts.append(part.message.content or "")
            last = part
        return "".join(parts), (last.eval_count or 0) if last is not None else 0

    return reply


def openai_reply(url):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    async def reply(row):
        parts, tokens = [], 0
        stream = await client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": row["question"]}],
            stream=True,
            stream_options={"include_usage": True},
            seed=1,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens or 0
        return "".join(parts), tokens

    return reply


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["ollama", "openai"], required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--rows", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(a.rows) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # The client is imported and made before the clock starts.
    reply = (ollama_reply if a.kind == "ollama" else openai_reply)(a.url)
    with open(a.out, "w") as out:
        cpu0, t0 = cpu_secs(), time.monotonic()
        tokens = asyncio.run(run(rows, a.concurrency, out, reply))
        secs, cpu = time.monotonic() - t0, cpu_secs() - cpu0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"requests": len(rows), "tokens": tokens, "secs": secs, "cpu_secs": cpu, "peak_kb": peak_kb}))


if __name__ == "__main__":
    main()
