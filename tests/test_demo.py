"""The demo's corpus builder, and ``p2plb demo`` run as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p2plb.corpus import Corpus, build_corpus, module_name
from p2plb.demo import RecentRate, mean_rate


def write(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


# -- the corpus ------------------------------------------------------------------


def test_corpus_reads_docstrings_of_modules_classes_and_functions(
    tmp_path: Path,
) -> None:
    root = write(
        tmp_path,
        {
            "tokens.py": '''
                """Split text into Tokens; a token is a word."""

                class Scanner:
                    """Scan tokens from a stream, one at a time."""

                    def peek(self):
                        """Look at the next token without taking it."""
                        text = "this string is no docstring: zebra"
                        return text
            ''',
            "codec/__init__.py": '"""Encode streams of text."""\n',
            "codec/wide.py": '"""Encode text as UTF-16 streams."""\n',
            "broken.py": '"""Tokens in a broken file."""\ndef (:\n',
            "test/test_tokens.py": '"""Tokens tested."""\n',
            "codec/test_wide.py": '"""Streams tested."""\n',
            "notes.txt": "Tokens in a text file.",
        },
    )

    corpus = build_corpus(root)

    assert corpus.modules == ("codec", "codec.wide", "tokens")
    assert corpus.postings == {
        "encode": ("codec", "codec.wide"),
        "look": ("tokens",),
        "next": ("tokens",),
        "scan": ("tokens",),
        "split": ("tokens",),
        "stream": ("tokens",),
        "streams": ("codec", "codec.wide"),
        "taking": ("tokens",),
        "text": ("codec", "codec.wide", "tokens"),
        "time": ("tokens",),
        "token": ("tokens",),
        "tokens": ("tokens",),
        "word": ("tokens",),
    }
    assert corpus.occurrences["text"] == 3
    assert corpus.occurrences["tokens"] == 2
    assert corpus.words[:3] == ["text", "encode", "streams"]
    assert corpus.total_postings == 17
    assert corpus.source == f"docstrings of 3 modules in {root}"


def test_corpus_keeps_the_most_frequent_words_and_caps_postings(
    tmp_path: Path,
) -> None:
    files = {f"m{n}.py": f'"""Common words, {"rare " * n}ones."""\n' for n in range(6)}
    root = write(tmp_path, files)

    corpus = build_corpus(root, seed=1, max_words=2, max_postings=3)

    # Of the words used 6 times, "common" comes first by name.
    assert sorted(corpus.postings) == ["common", "rare"]
    assert corpus.occurrences == {"common": 6, "rare": 15}
    assert all(len(modules) == 3 for modules in corpus.postings.values())
    for modules in corpus.postings.values():
        assert list(modules) == sorted(modules)
        assert set(modules) <= set(corpus.modules)


def test_corpus_samples_modules_by_seed(tmp_path: Path) -> None:
    files = {f"m{n:02}.py": f'"""Module number {n:02}, alpha."""\n' for n in range(20)}
    root = write(tmp_path, files)

    first = build_corpus(root, seed=7, max_modules=5)
    again = build_corpus(root, seed=7, max_modules=5)
    other = build_corpus(root, seed=8, max_modules=5)

    assert first == again
    assert len(first.modules) == 5
    assert first.modules != other.modules


def test_corpus_of_this_python_is_bounded_and_deterministic() -> None:
    first = build_corpus(seed=3, max_modules=40, max_words=150, max_postings=4)
    again = build_corpus(seed=3, max_modules=40, max_words=150, max_postings=4)

    assert first == again
    assert len(first.postings) == 150
    assert len(first.modules) <= 40
    check_words(first, max_postings=4)


def test_corpus_falls_back_to_builtin_modules_without_sources(
    tmp_path: Path,
) -> None:
    corpus = build_corpus(tmp_path / "empty", seed=1, max_postings=5)

    assert corpus == build_corpus(tmp_path / "empty", seed=1, max_postings=5)
    assert corpus.source.endswith("modules built into Python")
    assert set(corpus.modules) <= set(sys.builtin_module_names)
    assert len(corpus.postings) > 100
    check_words(corpus, max_postings=5)


def check_words(corpus: Corpus, max_postings: int) -> None:
    for word, modules in corpus.postings.items():
        assert re.fullmatch(r"[a-z]{4,24}", word), word
        assert 1 <= len(modules) <= max_postings
        assert corpus.occurrences[word] >= len(modules)
    assert "which" not in corpus.postings  # a stop-word


def test_module_names() -> None:
    root = Path("/lib")
    assert module_name(root, root / "json" / "decoder.py") == "json.decoder"
    assert module_name(root, root / "json" / "__init__.py") == "json"
    assert module_name(root, root / "os.py") == "os"


# -- the rates it shows ------------------------------------------------------------


def test_the_live_rate_looks_back_over_its_window_only() -> None:
    rate = RecentRate(window=2.0)
    assert rate.text() == "0 requests/s (last 2 s)"

    for now, calls in [(0.0, 0), (0.5, 4000), (1.0, 5000), (2.5, 5900)]:
        rate.add(now, calls)

    # The sample at 0.0 is out of the window: 1,900 requests in 2.0 s.
    assert rate.per_second == 950.0
    assert rate.text() == "950 requests/s (last 2 s)"


def test_the_run_mean_is_the_figure_of_the_report_and_of_the_last_frame() -> None:
    # A run from a report: the live line said 2,875 (the last seconds, then
    # unlabelled) where the summary said 2,047 (the whole run).
    assert mean_rate(30_714, 15.0) == "2,048 requests/s (mean of 15.0 s)"
    assert mean_rate(0, 0.0) == "0 requests/s (mean of 0.0 s)"


# -- p2plb demo, end to end ------------------------------------------------------


def run_demo(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``p2plb demo --quick`` with its temporary directory under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
    env["TMPDIR"] = str(tmp_path)
    env["COLUMNS"] = "160"
    return subprocess.run(
        [sys.executable, "-m", "p2plb", "demo", "--quick", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )


def pids_of(output: str) -> list[int]:
    return sorted({int(pid) for pid in re.findall(r"\bpid (\d+)", output)})


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie nobody reaped yet counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def working_in(directory: Path) -> list[int]:
    """Processes whose working directory is inside ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(directory)):
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_demo_runs_fails_over_and_cleans_up(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--seed", "5")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"SIGKILL to indexer i\d \(pid \d+\)", out)
    report = out[out.index("Where ") :]
    for id in ("i1", "i2", "i3"):
        assert re.search(rf"│ {id}\s+│ (healthy|killed) ", report), id
    assert len(re.findall(r"│ killed ", report)) == 1
    assert re.search(r"Indexer i\d was killed with SIGKILL at [\d.]+ s", report)
    assert "Failed requests: 0" in out
    assert "Stopped the cluster" in out
    # The live view's last frame and the report: one figure, saying what it is.
    rates = re.findall(r"[\d,]+ requests/s \(mean of [\d.]+ s\)", out)
    assert len(rates) == 2 and rates[0] == rates[1], rates

    pids = pids_of(out)
    assert len(pids) == 4
    assert not [pid for pid in pids if alive(pid)]
    assert working_in(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_keeps_the_cluster_running_when_asked(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--keep-running", "--strategy", "round_robin")
    pids = pids_of(result.stdout)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        url = re.search(r"p2plb status --balancer (\S+)", result.stdout)
        assert url is not None, result.stdout
        stop = re.search(r"kill ([\d ]+); sleep 2; rm -rf (\S+)", result.stdout)
        assert stop is not None, result.stdout

        status = subprocess.run(
            [sys.executable, "-m", "p2plb", "status", "--json"]
            + ["--balancer", url.group(1)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        assert '"total_indexers": 3' in status.stdout
        assert '"strategy": "round_robin"' in status.stdout

        # The killed indexer is not in the command that stops the others.
        running = [int(pid) for pid in stop.group(1).split()]
        assert len(running) == 3
        assert set(running) < set(pids)
        assert all(alive(pid) for pid in running)
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while [pid for pid in pids if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _demo_servers() -> list[int]:
    """Pids of processes running in a demo's temporary directory."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if "p2plb-demo-" in cwd:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_sigterm_stops_the_demo_and_its_cluster() -> None:
    before = set(_demo_servers())
    demo = subprocess.Popen(
        [sys.executable, "-m", "p2plb", "demo", "--quick", "--duration", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (set(_demo_servers()) - before):  # the cluster is up
        assert time.monotonic() < deadline and demo.poll() is None
        time.sleep(0.1)

    demo.send_signal(signal.SIGTERM)
    output, _ = demo.communicate(timeout=30)

    assert demo.returncode == 130, output
    assert "p2plb: error: interrupted; the cluster was stopped" in output
    assert not set(_demo_servers()) - before
