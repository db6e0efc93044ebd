"""Query embedding without torch: the model exported once to ONNX, run by onnxruntime.

Importing torch and sentence-transformers costs a CLI process about 5 s of CPU on a
2-core machine (``python -X importtime``), for one short question. A query only needs
the model's forward pass, its pooling and its normalisation, and onnxruntime (already
installed: chromadb depends on it) runs that forward pass in ~0.3 s of import plus
milliseconds per question.

The export is written the first time a process has to load the model anyway (the first
``kbsync query``, or a sync that embedded something) into the user's cache
(``embedding.onnx_cache``, default ``~/.cache/kbsync/onnx``, shared by data dirs), keyed
by the model's identity and its weight files' sizes and modification times, so a changed
model is exported anew. Only sentence-transformers models made of a ``Transformer``, a
``Pooling`` (mean or CLS) and optionally a ``Normalize`` module qualify (MiniLM, mpnet,
e5, bge, LaBSE-style models with a Dense layer do not and keep the torch path).

The vectors equal sentence-transformers' own within float rounding (max abs diff ~1e-7
measured on all-MiniLM-L6-v2; ``tests/test_embedding.py`` checks < 1e-5): the same
tokenizer (``tokenizers``, truncated at the model's ``max_seq_length``), the same
pooling formula (``sentence_transformers.models.Pooling``: mean over the attention
mask, or the first token), the same L2 normalisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from transforms.embedding import (
    EmbedderSpec,
    EmbeddingModelError,
    TokenizerSide,
    load_tokenizer,
    resolve_model,
)

log = logging.getLogger(__name__)

#: ONNX opset of the export (onnxruntime >= 1.14 runs it)
OPSET = 17


def query_path(model_dir: Path) -> tuple[str, bool] | None:
    """``(pooling, normalize)`` when the model at ``model_dir`` can be run from ONNX:
    a sentence-transformers directory (``modules.json``) of a ``Transformer``, a
    ``Pooling`` of mean or CLS alone, and optionally a ``Normalize`` module; else
    ``None`` (max, mean-sqrt-len, weighted or combined pooling, a Dense layer, ...)."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        config = json.loads((model_dir / modules[1]["path"] / "config.json")
                            .read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    modes = {key for key, on in config.items() if key.startswith("pooling_mode") and on is True}
    pooling = {frozenset({"pooling_mode_mean_tokens"}): "mean",
               frozenset({"pooling_mode_cls_token"}): "cls"}.get(frozenset(modes))
    return (pooling, kinds[-1] == "Normalize") if pooling else None


def export_path(spec: EmbedderSpec, cache_dir: Path) -> Path | None:
    """Where the ONNX export of ``spec.model`` lives under ``cache_dir``, or ``None``
    when the model does not qualify (not a local sentence-transformers directory made of
    Transformer + mean/CLS Pooling [+ Normalize]).

    The file name carries the model identity and a digest of its weight files' names,
    sizes and modification times (nanoseconds), so replacing the weights changes it.
    """
    name, target = resolve_model(spec.model)
    model_dir = Path(target)
    if query_path(model_dir) is None:
        return None
    digest = hashlib.sha256(name.encode())
    for weights in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return cache_dir / f"{slug}-{digest.hexdigest()[:16]}.onnx"


def export_onnx(spec: EmbedderSpec, path: Path) -> Path:
    """Export the transformer of ``spec.model`` (fp32, on the CPU) to ONNX at ``path``.

    Uses ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``; needs
    the ``onnx`` package) and dynamic batch and sequence axes. The file is written
    beside ``path`` and renamed into place, so a killed export leaves no half file.

    Returns:
        ``path``.

    Raises:
        EmbeddingModelError: the model cannot be loaded or exported.
    """
    import warnings

    import torch
    from transformers import AutoModel, AutoTokenizer

    _, target = resolve_model(spec.model)
    try:
        model = AutoModel.from_pretrained(target).eval()
        tokenizer = AutoTokenizer.from_pretrained(target)
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        raise EmbeddingModelError(f"cannot load {spec.model!r} for the ONNX export: "
                                  f"{type(exc).__name__}: {exc}") from None
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in tokenizer.model_input_names]
    sample = tokenizer(["an example", "a second, longer example"], padding=True,
                       return_tensors="pt")

    class _Forward(torch.nn.Module):
        """The transformer's last hidden state, with the inputs as keywords."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, inputs, strict=True))).last_hidden_state

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Forward(model).eval(), tuple(sample[n] for n in names),
                              str(partial), input_names=names,
                              output_names=["last_hidden_state"], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
        os.replace(partial, path)
        for older in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.onnx"):
            if older != path:  # an export of replaced weights
                older.unlink(missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        partial.unlink(missing_ok=True)
        raise EmbeddingModelError(f"ONNX export of {spec.model!r} failed: "
                                  f"{type(exc).__name__}: {exc}") from None
    log.info("exported %s to ONNX at %s", spec.model, path)
    return path


class OnnxEmbedder(TokenizerSide):
    """The model's ONNX export run by onnxruntime on the CPU; no torch imported.

    Attributes:
        name: the model identity (as :class:`transforms.embedding.Embedder`).
        dimension: length of each vector.
        max_seq_length: tokens the model reads; longer inputs are truncated.

    Raises:
        EmbeddingModelError: the model does not qualify, or the export cannot be read.
    """

    def __init__(self, spec: EmbedderSpec, path: Path) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        self.spec = spec
        self.name, target = resolve_model(spec.model)
        self.tokenizer = load_tokenizer(spec.model, spec.offline)
        self.prefixes = self.tokenizer.prefixes
        self.max_seq_length = self.tokenizer.max_seq_length
        model_dir = Path(target)
        shape = query_path(model_dir)
        if shape is None:
            raise EmbeddingModelError(f"{spec.model!r} has no ONNX query path")
        self._pooling, self._normalize = shape
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.enable_truncation(self.max_seq_length)
        tok.enable_padding()
        self._tok = tok
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
            raise EmbeddingModelError(f"cannot read the ONNX export {path}: "
                                      f"{type(exc).__name__}: {exc}") from None
        self._inputs = [i.name for i in self._session.get_inputs()]
        self.dimension = int(self._session.get_outputs()[0].shape[-1])
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None,
               kind: str = "query", label: str = "") -> np.ndarray:
        """Embed ``texts`` like :meth:`transforms.embedding.Embedder.encode`; returns a
        ``(len(texts), dimension)`` float32 array (unit vectors when the model
        normalises)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        prefix = self.prefixes.get(kind, "")
        step = max(self.spec.batch_size, 1)
        parts = []
        for start in range(0, len(texts), step):
            batch = [prefix + t for t in texts[start:start + step]]
            encodings = self._tok.encode_batch(batch)
            feed = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings],
                                           dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            with self._lock:
                hidden = self._session.run(None, {n: feed[n] for n in self._inputs})[0]
            if self._pooling == "cls":
                pooled = hidden[:, 0]
            else:  # sentence_transformers.models.Pooling, pooling_mode_mean_tokens
                mask = feed["attention_mask"][..., None].astype(hidden.dtype)
                pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            if self._normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
                pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True),
                                          1e-12, None)
            parts.append(pooled.astype(np.float32, copy=False))
            if progress:
                progress(min(start + step, len(texts)))
        return np.concatenate(parts)


def ensure_export(spec: EmbedderSpec, cache_dir: Path) -> Path | None:
    """The ONNX export of ``spec.model`` under ``cache_dir``, made now if missing.

    Returns ``None`` (and logs why) when the model does not qualify or the export fails;
    callers then keep the torch path. Costs one model load and ~5-10 s on 2 CPU cores
    the first time, nothing afterwards.
    """
    path = export_path(spec, cache_dir)
    if path is None or path.is_file():
        return path
    try:
        return export_onnx(spec, path)
    except (EmbeddingModelError, OSError) as exc:
        log.warning("queries keep the torch path: %s", exc)
        return None


@lru_cache(maxsize=4)
def load_query_encoder(spec: EmbedderSpec, cache_dir: Path) -> object:
    """The encoder for questions with the in-process backend: an :class:`OnnxEmbedder`
    over the model's export under ``cache_dir`` (made on first use, see
    :func:`ensure_export`), else the sentence-transformers model
    (:func:`transforms.embedding.load_embedder`). One per spec and process."""
    path = ensure_export(spec, cache_dir)
    if path is None:
        from transforms.embedding import load_embedder

        return load_embedder(spec)
    return OnnxEmbedder(spec, path)
