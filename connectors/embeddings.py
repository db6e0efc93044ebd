"""The embedder behind ``embedding.backend``: the model in-process, or a warm
OpenAI-compatible embeddings server on the GPU machine.

* ``sentence-transformers`` (default): :func:`transforms.embedding.load_embedder`, the
  model loaded in this process (CPU, or the local GPU in fp16).
* ``openai``: :class:`RemoteEmbedder`, which posts texts to ``embedding.base_url``'s
  ``/embeddings`` endpoint with the ``openai`` client
  (https://platform.openai.com/docs/api-reference/embeddings/create). The server is
  Infinity (``infinity_emb v2``, https://michaelfeil.eu/infinity/) in kbsync's
  docker-compose.yml; text-embeddings-inference and vLLM speak the same API. The model
  stays loaded on the server between batches; this side loads the model's tokenizer
  only (:class:`transforms.embedding.ModelTokenizer`), so it never imports torch.

Both embedders offer ``name``, ``dimension``, ``max_text_tokens``, ``count_tokens``,
``fertility`` and ``encode(texts, progress=None, kind="passage")``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from connectors.base import redact
from connectors.chroma import EmbeddingModelMismatch
from transforms.embedding import (
    EmbedderSpec,
    TokenizerSide,
    load_embedder,
    load_tokenizer,
    resolve_model,
)

log = logging.getLogger(__name__)


class EmbeddingServerError(Exception):
    """The embeddings server did not answer a batch (unreachable, stopped, error reply).

    The message names the endpoint, the model and the batch; nothing of the batch was
    written, so the sync stops with its cursor and checkpoints where they were.
    """


class RemoteEmbedder(TokenizerSide):
    """Texts -> vectors through an OpenAI-compatible ``/embeddings`` endpoint.

    Args:
        spec: ``spec.model`` is the identity asked for (the server must serve it under
            that name: Infinity's ``--served-model-name``); ``spec.base_url`` the
            endpoint (``http://gpu-host:7997``; ``/v1`` is not needed by Infinity);
            ``spec.batch_size`` is not used here (the server batches for its GPU).
        api_key: sent as a bearer token (Infinity's ``--api-key``); never logged.

    Attributes:
        name: the model identity (see :func:`transforms.embedding.resolve_model`).
        device: the endpoint, for logs and summaries.
        requests: embedding requests sent so far (for benchmarks).

    Raises (from :meth:`encode`):
        EmbeddingServerError: the server is unreachable or refused the batch.
        connectors.chroma.EmbeddingModelMismatch: the server answered with another model.
    """

    def __init__(self, spec: EmbedderSpec, api_key: str | None = None) -> None:
        from openai import OpenAI

        if not spec.base_url:
            raise ValueError("embedding.backend is openai but embedding.base_url is not set")
        self.spec = spec
        self.name, _ = resolve_model(spec.model)
        self.tokenizer = load_tokenizer(spec.model, spec.offline)
        self.prefixes = self.tokenizer.prefixes
        self.requests = 0
        self._secrets = (api_key,)
        #: the server as errors name it (no user:password@ of the URL, no key)
        self._where = redact(spec.base_url, self._secrets)
        self.device = self._where
        self._dimension: int | None = None
        self._client = OpenAI(base_url=spec.base_url, api_key=api_key or "none",
                              timeout=spec.timeout_seconds, max_retries=spec.retries)

    @property
    def dimension(self) -> int:
        """Length of the vectors (asked of the server once, with a one-word text)."""
        if self._dimension is None:
            self._dimension = int(self.encode(["dimension"], kind="query").shape[1])
        return self._dimension

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None,
               kind: str = "passage", label: str = "") -> np.ndarray:
        """Embed ``texts`` in one request; returns ``(len(texts), dimension)`` float32
        unit vectors (normalised here as well, whatever the server does).

        Args:
            texts: chunk texts or questions; the model family's prefix for ``kind`` is
                prepended.
            progress: called with ``len(texts)`` once the vectors arrived.
            label: names the batch in error messages (``"batch 3 (256 chunks)"``).
        """
        if not texts:
            return np.zeros((0, self._dimension or 0), dtype=np.float32)
        from openai import APIError

        prefix = self.prefixes.get(kind, "")
        inputs = [prefix + t for t in texts] if prefix else list(texts)
        what = label or f"{len(inputs)} text(s)"
        self.requests += 1
        try:
            reply = self._client.embeddings.create(model=self.name, input=inputs,
                                                   encoding_format="float")
        except APIError as exc:
            status = getattr(exc, "status_code", None)
            # a server or proxy may echo the request: its words pass through redact
            body = redact(str(getattr(exc, "body", None) or exc)[:300], self._secrets)
            if status in (400, 404, 422) and "model" in body.lower():
                raise EmbeddingModelMismatch(
                    f"the embeddings server at {self._where} does not serve model "
                    f"{self.name!r} ({status}: {body}); give the server and kbsync the same "
                    "model (Infinity: --served-model-name)") from None
            raise EmbeddingServerError(
                f"embeddings server {self._where} (model {self.name}) failed on {what}: "
                f"{type(exc).__name__}{f' {status}' if status else ''}: {body}") from None
        if reply.model and reply.model != self.name:
            raise EmbeddingModelMismatch(
                f"the embeddings server at {self._where} answered with model "
                f"{reply.model!r}, but embedding.model is {self.name!r}")
        rows = sorted(reply.data, key=lambda d: d.index)
        vectors = np.asarray([d.embedding for d in rows], dtype=np.float32)
        if vectors.shape[0] != len(inputs):
            raise EmbeddingServerError(
                f"embeddings server {self._where} returned {vectors.shape[0]} vectors "
                f"for {what}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.where(norms > 0, norms, 1.0)
        self._dimension = int(vectors.shape[1])
        if progress:
            progress(len(texts))
        return vectors

    def close(self) -> None:
        self._client.close()


@lru_cache(maxsize=4)
def load_encoder(spec: EmbedderSpec, api_key: str | None = None) -> Any:
    """The embedder for ``spec.backend``: a :class:`RemoteEmbedder` for ``openai``, else
    the model loaded in this process (:func:`transforms.embedding.load_embedder`).
    One per spec and process."""
    if spec.backend == "openai":
        return RemoteEmbedder(spec, api_key)
    return load_embedder(spec)
