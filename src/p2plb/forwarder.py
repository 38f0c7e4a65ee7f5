"""The least an aiohttp proxy can do, as a reference for ``--suite proxy``.

It forwards every ``GET`` to fixed backends in turn over pooled keep-alive
connections and passes the answer on: no validation, no load, no health, no
retry, no metrics.  Set beside p2plb's proxy and HAProxy on the same backends,
it shows how much of the gap to HAProxy is aiohttp's and how much is p2plb's.
For benchmarks only.

Usage: ``python -m p2plb.forwarder --port 0 URL [URL ...]``; it logs
``forwarder.started url=...`` once it serves, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from collections.abc import Sequence

import aiohttp
from aiohttp import web

__all__ = ["serve"]


async def serve(port: int, backends: Sequence[str]) -> None:
    """Forward until SIGTERM or SIGINT."""
    turn = itertools.cycle(backends)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=256)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False
    ) as session:

        async def forward(request: web.Request) -> web.Response:
            url = next(turn) + request.rel_url.raw_path_qs
            async with session.get(url) as answer:
                body = await answer.read()
                return web.Response(
                    body=body, status=answer.status, content_type=answer.content_type
                )

        app = web.Application()
        app.router.add_get("/{path:.*}", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"forwarder.started url=http://127.0.0.1:{bound}", file=sys.stderr)
        sys.stderr.flush()

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2plb.forwarder")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("backends", nargs="+", metavar="URL")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(args.port, args.backends))
    else:
        uvloop.run(serve(args.port, args.backends))


if __name__ == "__main__":
    main()
