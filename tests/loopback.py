"""An aiohttp application served by the test's own process, on loopback.

For stand-ins of p2plb nodes whose answers a test chooses; real p2plb servers
run as processes (``procs``).
"""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free port; its runner (to clean up) and its URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
