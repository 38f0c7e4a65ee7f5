"""``p2plb status`` and ``p2plb strategy``: exit codes and one-line errors, against
real balancers, dead ports and small fake balancers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from procs import Procs
from test_cli_index import dead_url, run
from test_tls import make_ca


@pytest.mark.parametrize("command", [["status"], ["strategy"], ["strategy", "p2c"]])
def test_an_unreachable_balancer_is_described_as_the_client_describes_it(
    command: list[str],
) -> None:
    dead = dead_url()

    result = run(*command, "--balancer", dead)

    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"p2plb: error: balancer {dead}: cannot connect (connection refused)\n"
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_a_private_ca_without_ca_file_gets_the_hint(
    procs: Procs, tmp_path: Path
) -> None:
    ca, cert, key = make_ca(tmp_path)
    balancer = procs.balancer(
        "balancer", "--tls-cert", str(cert), "--tls-key", str(key)
    )

    untrusting = run("status", "--balancer", balancer.url)
    trusting = run("status", "--json", "--balancer", balancer.url, "--ca-file", str(ca))

    assert (untrusting.exit_code, untrusting.stdout) == (1, "")
    assert untrusting.stderr == (
        f"p2plb: error: balancer {balancer.url}: TLS certificate not trusted "
        "(unable to get local issuer certificate); pass the cluster's CA with "
        "ca_file= or --ca-file\n"
    )
    assert (trusting.exit_code, trusting.stderr) == (0, "")
