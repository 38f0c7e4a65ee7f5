"""TLS end to end: a private CA, HTTPS servers, peers and clients verifying."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p2plb import AsyncClient
from p2plb.errors import ConfigError, P2PLBError, RequestError
from p2plb.tls import client_context, server_context
from procs import Procs, eventually

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command"
)


def make_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=p2plb test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "node.pem",
            "-extfile", "san.ext")  # fmt: skip
    return folder / "ca.pem", folder / "node.pem", folder / "node.key"


def test_bad_tls_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tls-key: TLS needs both"):
        server_context(str(tmp_path / "cert.pem"), None)
    with pytest.raises(ConfigError, match="--tls-cert: cannot load"):
        server_context(str(tmp_path / "none.pem"), str(tmp_path / "none.key"))
    with pytest.raises(ConfigError, match="--ca-file: no such file"):
        client_context(str(tmp_path / "none.pem"))
    with pytest.raises(RequestError, match="ca_file: no such file"):
        AsyncClient("https://127.0.0.1:1", ca_file=str(tmp_path / "none.pem"))


async def test_a_cluster_over_tls(procs: Procs, tmp_path: Path) -> None:
    ca, cert, key = make_ca(tmp_path)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key), "--ca-file", str(ca))
    balancer = procs.balancer("balancer", *tls)
    assert balancer.url.startswith("https://127.0.0.1:")
    quick = ("--report-interval", "0.3s", "--membership-interval", "0.2s")
    for n in (1, 2):
        procs.indexer(f"i{n}", "--balancer", balancer.url, *tls, *quick)

    async with AsyncClient(balancer.url, ca_file=str(ca)) as client:

        async def both_serving() -> bool:
            try:
                table = await client.stats()
            except P2PLBError:
                return False
            return bool(table) and _serving(balancer.url, str(ca)) == 2

        await eventually(both_serving)
        assert await client.add_to_index("secure", ["a", "b"]) == 2  # two copies
        assert await client.get_index("secure") == ["a", "b"]

    async with AsyncClient(balancer.url) as untrusting:  # system store only
        with pytest.raises(P2PLBError) as info:
            await untrusting.get_index("secure")
    assert "TLS certificate not trusted" in str(info.value)
    assert "pass the cluster's CA with ca_file= or --ca-file" in str(info.value)


async def test_servers_verify_their_peers(procs: Procs, tmp_path: Path) -> None:
    ca, cert, key = make_ca(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_cert, other_key = make_ca(tmp_path / "other")
    serve = ("--tls-cert", str(cert), "--tls-key", str(key))
    balancer = procs.balancer("balancer", *serve, "--ca-file", str(ca))

    # An indexer without the cluster's CA does not trust the balancer: it
    # cannot register, and says why.
    lost = procs.indexer("i1", "--balancer", balancer.url, *serve)
    lost.wait_for(
        r"reporter\.balancer_unreachable balancer=\S+ error=.*"
        r"TLS certificate not trusted"
    )

    # A balancer does not trust an indexer whose certificate another CA
    # signed: the indexer registers, but the balancer's probes fail on TLS.
    stranger = procs.indexer(
        "i2",
        "--balancer",
        balancer.url,
        "--tls-cert",
        str(other_cert),
        "--tls-key",
        str(other_key),
        "--ca-file",
        str(ca),
    )
    stranger.wait_for(r"reporter\.registered")
    balancer.wait_for(
        r"indexer\.unhealthy id=i2 reason=.*probe failed: TLS certificate not "
        r"trusted \(unable to get local issuer certificate\); pass the cluster's CA"
    )
    assert _serving(balancer.url, str(ca)) == 0


def _serving(balancer: str, ca: str) -> int:
    shown = subprocess.run(
        [sys.executable, "-m", "p2plb", "status", "--json", "--balancer", balancer,
         "--ca-file", ca],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if shown.returncode != 0:
        return 0
    import json

    rows = json.loads(shown.stdout)[0]["status"]["indexers"]
    return sum(1 for r in rows if r["healthy"] and r["state"] == "serving")
