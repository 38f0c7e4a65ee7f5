"""Running a server: bind, serve until a signal, then stop within a deadline.

The order of a clean stop matters to the cluster, so it is spelled out once here:

1. SIGTERM or SIGINT arrives; ``before_stop`` runs while the listener is still
   open (an indexer unregisters and keeps serving for its drain period, so
   routed clients notice before connections are refused).
2. The listener closes and in-flight requests get up to ``shutdown_timeout``
   to finish; whatever is left is cut.
3. ``after_stop`` runs (close the database, save the state).

A second signal during step 1 skips the rest of the drain: an operator who
presses Ctrl-C twice wants out now.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from p2plb.errors import ConfigError

__all__ = ["Listener", "bind", "run_server", "url_for"]

logger = logging.getLogger(__name__)


class Listener:
    """A bound, listening socket and the URL it answers on."""

    def __init__(
        self, sock: socket.socket, host: str, tls: ssl.SSLContext | None = None
    ) -> None:
        self.sock = sock
        self.host = host
        self.tls = tls
        self.port: int = sock.getsockname()[1]

    @property
    def url(self) -> str:
        return url_for(self.host, self.port, "https" if self.tls else "http")


def url_for(host: str, port: int, scheme: str = "http") -> str:
    bare = host.strip("[]")
    if ":" in bare:
        return f"{scheme}://[{bare}]:{port}"
    return f"{scheme}://{bare}:{port}"


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def bind(host: str, port: int, tls: ssl.SSLContext | None = None) -> Listener:
    """Bind now, so port 0 turns into the real port before anyone is told.

    With ``tls`` the socket serves HTTPS only (see ``p2plb.tls``).
    """
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"--host: cannot resolve {host!r}: {exc.strerror}") from exc

    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"--port: cannot listen on {host}:{port}: {exc.strerror}"
        ) from exc
    sock.setblocking(False)
    return Listener(sock, host, tls)


async def run_server(
    app: web.Application,
    listener: Listener,
    *,
    shutdown_timeout: float,
    on_started: Callable[[], Awaitable[None]] | None = None,
    before_stop: Callable[[], Awaitable[None]] | None = None,
    after_stop: Callable[[], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``app`` on ``listener`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    hurry = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            hurry.set()
        logger.info("server.signal signal=%s", signal.Signals(signum).name)
        stop.set()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)

    # aiohttp's access log costs a few percent of throughput: on at DEBUG only.
    access = logging.getLogger("p2plb.access")
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        access_log=access if access.isEnabledFor(logging.DEBUG) else None,
    )
    await runner.setup()
    site = web.SockSite(runner, listener.sock, ssl_context=listener.tls)
    try:
        await site.start()
        if on_started is not None:
            await on_started()
        await stop.wait()

        # Step 1: drain while still listening; a second signal cuts it short.
        if before_stop is not None:
            drain = asyncio.ensure_future(before_stop())
            hurried = asyncio.ensure_future(hurry.wait())
            await asyncio.wait({drain, hurried}, return_when=asyncio.FIRST_COMPLETED)
            hurried.cancel()
            if not drain.done():
                drain.cancel()
                logger.warning("server.drain_skipped reason=second signal")
            with contextlib.suppress(asyncio.CancelledError):
                await drain
    finally:
        # Step 2: stop listening, let in-flight requests finish, cut the rest.
        await runner.cleanup()
        for signum in signals:
            loop.remove_signal_handler(signum)
        # Step 3: release what the server held.
        if after_stop is not None:
            await after_stop()
