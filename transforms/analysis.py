"""Text analysis for the lexical (BM25) index: tokens, identifiers, stop words, stems.

Russian and English are analysed in one pass:

* words are runs of letters, digits and underscores; ``ё`` is folded to ``е``;
* code identifiers are split into their parts and also kept whole
  (``getUserName`` -> ``getusername get user name``; ``max_file_bytes`` ->
  ``max_file_bytes max file bytes``; ``HTTPServer`` -> ``httpserver http server``);
* stop words are dropped (Lucene's English list and NLTK's Russian list, as shipped by
  ``bm25s.stopwords``);
* each word is stemmed with the Snowball stemmer of *its own script* (Cyrillic ->
  Russian, Latin -> English, via PyStemmer). Choosing per word rather than per chunk
  keeps mixed chunks right ("настройка YAML-файлов" stems both halves), and costs
  nothing more than a per-chunk language detection.

So "документации", "документацию" and "документация" all become ``документац``; a query
in one word form finds chunks with the others. :func:`detect_language` (share of
Cyrillic letters) labels a whole text when a caller needs one language.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import Stemmer

#: Bump when analysis changes: the lexical index is rebuilt when its version differs.
ANALYZER_VERSION = 1

_WORD = re.compile(r"[0-9A-Za-z_\u00C0-\u024F\u0400-\u04FF]+")
_CYRILLIC = re.compile(r"[\u0400-\u04FF]")
_LATIN = re.compile(r"[A-Za-z\u00C0-\u024F]")
# identifier parts: "HTTPServer2Go" -> HTTP, Server, 2, Go
_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|$)|[A-Z]?[a-z]+|[A-Z]+|\d+|[\u0400-\u04FF]+")


def _bm25s_stopwords() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(STOPWORDS_EN, STOPWORDS_RUSSIAN)`` of ``bm25s.stopwords``, read from that
    module's file without running ``bm25s/__init__`` (which imports scipy: ~0.3 s of
    every CLI command's start-up). The module is plain data with no imports."""
    package = importlib.util.find_spec("bm25s")
    if package is None or not package.submodule_search_locations:
        raise ImportError("bm25s is not installed (pip install bm25s)")
    location = Path(next(iter(package.submodule_search_locations))) / "stopwords.py"
    spec = importlib.util.spec_from_file_location("_kbsync_bm25s_stopwords", location)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.STOPWORDS_EN), tuple(module.STOPWORDS_RUSSIAN)


STOPWORDS_EN, STOPWORDS_RUSSIAN = _bm25s_stopwords()
_STOP = frozenset(STOPWORDS_EN) | frozenset(w.replace("ё", "е") for w in STOPWORDS_RUSSIAN)
_STEMMERS = {"ru": Stemmer.Stemmer("russian"), "en": Stemmer.Stemmer("english")}


def detect_language(text: str) -> str:
    """``"ru"`` when at least 30% of the letters are Cyrillic, else ``"en"``."""
    cyr = len(_CYRILLIC.findall(text))
    lat = len(_LATIN.findall(text))
    return "ru" if cyr and cyr >= 0.3 * (cyr + lat) else "en"


def split_identifier(word: str) -> list[str]:
    """Parts of a code identifier (camelCase, PascalCase, snake_case, digits); a plain
    word gives itself."""
    parts = [p for chunk in word.split("_") if chunk for p in _PARTS.findall(chunk)]
    return parts or [word]


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    lang = "ru" if _CYRILLIC.search(word) else "en"
    return _STEMMERS[lang].stemWord(word)


@lru_cache(maxsize=200_000)
def _word_terms(raw: str) -> tuple[str, ...]:
    """The index terms of one word run (itself, its identifier parts), stemmed."""
    parts = split_identifier(raw)
    words = [raw.lower()] + ([p.lower() for p in parts] if len(parts) > 1 else [])
    terms: list[str] = []
    for word in words:
        word = word.replace("ё", "е").strip("_")
        if not word or word in _STOP:
            continue
        if word.isdigit():
            terms.append(word)
        elif len(word) > 1 or _CYRILLIC.search(word):
            terms.append(_stem(word))
    return tuple(terms)


def analyze(text: str) -> list[str]:
    """The index terms of ``text``, in order (duplicates kept, so BM25 sees term
    frequency). Terms of a word are remembered per process (a corpus repeats its words)."""
    terms: list[str] = []
    for raw in _WORD.findall(text):
        terms.extend(_word_terms(raw))
    return terms
