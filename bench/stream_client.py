"""Open C concurrent streaming chat completions and report time to first chunk (stdlib asyncio only).

    python bench/stream_client.py --url http://127.0.0.1:3000/v1/chat/completions -c 500 --key sk-...
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from urllib.parse import urlsplit

PROMPT = "Say hello in one short sentence."


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="full chat-completions URL on 127.0.0.1")
    parser.add_argument("-c", "--concurrency", type=int, default=1, help="streams open at once")
    parser.add_argument("-n", "--requests", type=int, default=0, help="streams in all (default: C)")
    parser.add_argument("--key", default="", help="bearer key")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per stream")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return parser.parse_args(argv)


def build_request(url: str, key: str, model: str) -> tuple[str, int, bytes]:
    """Host, port and the raw HTTP/1.1 request bytes for one stream."""
    parts = urlsplit(url)
    body = json.dumps({"model": model, "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}).encode()
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Accept: text/event-stream", "Connection: close"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return parts.hostname, parts.port or 80, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def body_pieces(reader: asyncio.StreamReader, headers: dict):
    """Yield the response body as it arrives: chunked, Content-Length, or until close."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            yield (await reader.readexactly(size + 2))[:-2]
    remaining = int(headers["content-length"]) if "content-length" in headers else None
    while remaining is None or remaining > 0:
        piece = await reader.read(65536 if remaining is None else min(65536, remaining))
        if not piece:
            return
        if remaining is not None:
            remaining -= len(piece)
        yield piece


async def one_stream(host: str, port: int, raw: bytes) -> dict:
    """Run one stream; return its timings, or the reason it failed."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        first, body = None, bytearray()
        async for piece in body_pieces(reader, headers):
            if first is None and b"data:" in piece:
                first = time.perf_counter() - start
            body += piece
        total = time.perf_counter() - start
    finally:
        writer.close()
    if status != 200:
        return {"error": f"status {status}"}
    if b'data: {"error"' in body:
        return {"error": "error event"}
    if b"data: [DONE]" not in body:
        return {"error": "no [DONE]"}
    return {"ttft": first, "total": total, "chunks": body.count(b"data: ")}


async def guarded(host: str, port: int, raw: bytes, timeout: float) -> dict:
    """One stream with a deadline; exceptions become failures."""
    try:
        return await asyncio.wait_for(one_stream(host, port, raw), timeout)
    except asyncio.TimeoutError:
        return {"error": "timeout"}
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
        return {"error": type(exc).__name__}


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> float | None:
    """Seconds to milliseconds, rounded to 0.1."""
    return None if value is None else round(value * 1000, 1)


async def run(url: str, concurrency: int, total: int, key: str = "", model: str = "gpt-4o-mini",
              timeout: float = 60.0) -> dict:
    """Run `total` streams, `concurrency` at a time; summarise TTFT, totals and failures."""
    host, port, raw = build_request(url, key, model)
    todo = iter(range(total))
    results: list[dict] = []

    async def worker():
        """Take streams off the shared counter until none are left."""
        for _ in todo:
            results.append(await guarded(host, port, raw, timeout))

    started, started_at = time.perf_counter(), time.time()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    totals = [r["total"] for r in ok]
    return {
        "concurrency": concurrency, "streams": total, "ok": len(ok), "failures": total - len(ok),
        "errors": dict(Counter(r["error"] for r in results if "error" in r)),
        "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "total_p50_ms": ms(percentile(totals, 50)), "total_p99_ms": ms(percentile(totals, 99)),
        "chunks_per_stream": ok[0]["chunks"] if ok else 0,
        "wall_s": round(time.perf_counter() - started, 2),
        "started_at": started_at,  # wall clock, for matching other processes' samples to the run
    }


def main() -> None:
    """Parse flags, run, print the summary."""
    args = parse_args()
    summary = asyncio.run(run(args.url, args.concurrency, args.requests or args.concurrency,
                              args.key, args.model, args.timeout))
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{summary['streams']} streams, {summary['concurrency']} at once: "
          f"TTFT p50 {summary['ttft_p50_ms']} ms, p99 {summary['ttft_p99_ms']} ms; "
          f"total p50 {summary['total_p50_ms']} ms, p99 {summary['total_p99_ms']} ms; "
          f"{summary['failures']} failures {summary['errors'] or ''} in {summary['wall_s']} s")


if __name__ == "__main__":
    main()
