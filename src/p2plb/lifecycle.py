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

Known shortcoming: in step 2 aiohttp stops reading from open connections, so a
request whose body is still arriving when the listener closes never gets the
rest of it and is cut at ``shutdown_timeout``; requests received whole finish.
The drain period of step 1, during which reading goes on, is what covers slow
senders.

Limits on what a connection may hold (slow and oversized clients):

* ``idle_timeout`` closes a connection that has no whole request after that
  long: idle between requests, or still trickling its request line and
  headers (a "slowloris" client).  aiohttp arms one timer at connect and after
  each answer, and data arriving does not rearm it, so it bounds both.  It
  must stay longer than the keep-alive of p2plb's own clients (30 s), so that
  they, not the server, close an idle connection.
* The request line may be up to ``MAX_REQUEST_LINE`` bytes, so that a URL too
  long for the application gets its JSON ``414`` (``p2plb.web``) rather than
  the parser's plain-text ``400``; a header line is limited to 8190 bytes and
  gets the parser's ``400``.
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
from p2plb.web import MAX_HEADER_LINE, MAX_REQUEST_LINE

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
    idle_timeout: float = 75.0,
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
        keepalive_timeout=idle_timeout,
        max_line_size=MAX_REQUEST_LINE,
        max_field_size=MAX_HEADER_LINE,
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
