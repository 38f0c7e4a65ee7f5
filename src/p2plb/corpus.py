"""A real corpus for the demo: which standard-library modules use which words.

Rules of this module:

* The text is the docstrings of the Python standard library installed with the
  running interpreter: module, class and function docstrings, read with
  ``ast`` from the ``.py`` sources, never by importing them.
* Where the install has no sources (some distributions ship only bytecode),
  the docstrings of the modules compiled into the interpreter
  (``sys.builtin_module_names``) are used instead.  Those import without side
  effects, and the result is still real text, only less of it.
* A word is a run of 4 to 24 ASCII letters, lower-cased, not a stop-word.
  Its postings are the modules whose docstrings use it; its occurrences are
  how often it appears in them, which the demo uses as its query frequency.
* Everything is bounded so that the demo stays quick: at most
  ``max_modules`` modules, the ``max_words`` most frequent words, and at most
  ``max_postings`` modules per word.
* The same ``seed`` and the same Python give the same corpus: the modules and
  the postings kept under the caps are drawn from ``random.Random(seed)`` over
  sorted lists, and every tie is broken by name.
"""

from __future__ import annotations

import ast
import importlib
import logging
import os
import random
import re
import sys
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Corpus", "build_corpus", "module_name"]

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z]+")
_MIN_LENGTH, _MAX_LENGTH = 4, 24

# Directories of the standard library that are not part of its documented
# surface: tests repeat the words of what they test, site-packages is not stdlib.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)

# Frequent English words of four letters or more that say nothing about a module.
_STOP_WORDS = frozenset(
    [
        "about",
        "above",
        "after",
        "again",
        "against",
        "also",
        "among",
        "another",
        "anything",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "cannot",
        "could",
        "does",
        "doing",
        "done",
        "down",
        "during",
        "each",
        "either",
        "else",
        "even",
        "every",
        "from",
        "further",
        "have",
        "having",
        "here",
        "however",
        "into",
        "itself",
        "just",
        "like",
        "made",
        "make",
        "many",
        "more",
        "most",
        "much",
        "must",
        "need",
        "only",
        "other",
        "otherwise",
        "over",
        "same",
        "should",
        "since",
        "some",
        "such",
        "than",
        "that",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "though",
        "through",
        "thus",
        "under",
        "unless",
        "until",
        "upon",
        "very",
        "want",
        "well",
        "were",
        "what",
        "when",
        "where",
        "whether",
        "which",
        "while",
        "will",
        "with",
        "within",
        "without",
        "would",
        "your",
    ]
)

_Documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


@dataclass(frozen=True)
class Corpus:
    """An inverted index: word -> the modules whose docstrings use it."""

    source: str
    modules: tuple[str, ...]
    postings: dict[str, tuple[str, ...]]
    occurrences: dict[str, int]

    @property
    def words(self) -> list[str]:
        """The words, most frequent first, ties by name."""
        return sorted(self.postings, key=lambda w: (-self.occurrences[w], w))

    @property
    def total_postings(self) -> int:
        return sum(len(modules) for modules in self.postings.values())


def build_corpus(
    root: Path | None = None,
    *,
    seed: int = 0,
    max_modules: int = 300,
    max_words: int = 2000,
    max_postings: int = 50,
) -> Corpus:
    """The corpus of the stdlib at ``root`` (default: this Python's), bounded."""
    rng = random.Random(seed)
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root

    files = sorted(_source_files(root))
    if len(files) > max_modules:
        files = sorted(rng.sample(files, max_modules))
    documents = dict(_read_sources(root, files))
    source = f"docstrings of {len(documents)} modules in {root}"
    if not documents:
        logger.info("corpus.no_sources root=%s using=builtin_modules", root)
        documents = _builtin_documents(sorted(sys.builtin_module_names)[:max_modules])
        source = f"docstrings of {len(documents)} modules built into Python"

    occurrences: Counter[str] = Counter()
    users: defaultdict[str, set[str]] = defaultdict(set)
    for module, text in documents.items():
        words = _words(text)
        occurrences.update(words)
        for word in words:
            users[word].add(module)

    kept = sorted(users, key=lambda w: (-occurrences[w], w))[:max_words]
    postings: dict[str, tuple[str, ...]] = {}
    for word in sorted(kept):
        modules = sorted(users[word])
        if len(modules) > max_postings:
            modules = sorted(rng.sample(modules, max_postings))
        postings[word] = tuple(modules)

    logger.debug(
        "corpus.built words=%d modules=%d source=%r",
        len(postings),
        len(documents),
        source,
    )
    return Corpus(
        source=source,
        modules=tuple(sorted(documents)),
        postings=postings,
        occurrences={word: occurrences[word] for word in postings},
    )


def module_name(root: Path, path: Path) -> str:
    """``json/decoder.py`` -> ``json.decoder``; a package is its ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _source_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for folder, dirs, names in os.walk(root):
        # Pruned in place, so the walk never enters a skipped directory.
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in names:
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(folder, name)


def _read_sources(root: Path, files: list[Path]) -> Iterator[tuple[str, str]]:
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (OSError, SyntaxError, ValueError) as exc:
            # The stdlib holds a few deliberately broken files (lib2to3 data).
            logger.debug("corpus.skipped path=%s error=%s", path, exc)
            continue
        text = "\n".join(filter(None, map(ast.get_docstring, _documented(tree))))
        if text:
            yield module_name(root, path), text


def _documented(tree: ast.Module) -> Iterator[_Documented]:
    """The modules, classes and functions of ``tree``, at any depth.

    Only statement lists are followed: a definition is always a statement, and
    skipping the expressions makes this several times faster than ``ast.walk``.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCUMENTED):
            yield node
        for field in _BLOCKS:
            stack.extend(getattr(node, field, ()))


def _builtin_documents(names: list[str]) -> dict[str, str]:
    """The docstrings of modules compiled into the interpreter, and their members."""
    documents: dict[str, str] = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - built-in modules always import
            continue
        docs = [module.__doc__]
        for attribute in sorted(vars(module)):
            if not attribute.startswith("_"):
                member = getattr(module, attribute)
                if callable(member):
                    docs.append(member.__doc__)
        text = "\n".join(doc for doc in docs if isinstance(doc, str))
        if text:
            documents[name] = text
    return documents


def _words(text: str) -> list[str]:
    return [
        word
        for word in _WORD.findall(text.lower())
        if _MIN_LENGTH <= len(word) <= _MAX_LENGTH and word not in _STOP_WORDS
    ]
