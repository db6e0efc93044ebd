"""Ask the index a question: hybrid retrieval, then the configured LLM answers from the
retrieved chunks only, citing them ``[1]``, ``[2]`` (``kbsync ask``).

:func:`answer_prompt` is also the validation flow's answer step, so a question is put
to the model the same way whether a user or the validation flow asks it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connectors.llm import LLMClient, LLMUnavailable, fit_contexts
from flows.retrieve import RetrievedChunk, retrieve
from flows.settings import Settings
from transforms.answering import Passage, answer_messages, format_contexts, question_language
from transforms.evaluation import citations
from transforms.replies import message_tokens

#: Said when no LLM answers (``kbsync ask`` exits 3 with it).
START_AN_LLM = ("start one with `kbsync llm serve` (the packaged stand-in model) and point "
                "kbsync at it with the settings it prints, or `ollama serve` and "
                "`ollama pull <llm.model>` for the configured Ollama model")


def answer_prompt(llm: LLMClient, question: str, hits: list[RetrievedChunk], *,
                  language: str | None = None) -> tuple[list[dict[str, str]], int]:
    """The messages that ask ``llm`` to answer ``question`` from ``hits``, and how many
    of the hits they hold: contexts that do not fit ``llm.max_context_tokens`` beside the
    instructions and the question are dropped from the lowest rank up.

    Raises:
        connectors.llm.PromptTooLong: the question alone does not fit.
    """
    contexts = format_contexts([Passage(h.title, h.text) for h in hits])
    fixed = message_tokens(answer_messages(question, [], language)) + 64
    kept = fit_contexts(fixed, contexts, llm.prompt_budget)
    return answer_messages(question, contexts[:kept], language), kept


@dataclass
class Answer:
    """What ``kbsync ask`` found and said.

    Attributes:
        question, language: as asked (``Russian`` or ``English``).
        hits: the retrieved chunks, best first; ``[n]`` in the answer is ``hits[n-1]``.
        used: how many of ``hits`` the model was given (the rest did not fit).
        text: the answer without reasoning; ``None`` when no LLM answered.
        cited: the ``[n]`` the answer cites (1-based, valid ones, in order).
        model: ``model @ server`` that answered.
        llm_error: why no LLM answered (then ``text`` is ``None``).
        seconds: ``retrieval`` and ``llm`` wall time.
    """

    question: str
    language: str
    hits: list[RetrievedChunk]
    used: int = 0
    text: str | None = None
    cited: list[int] = field(default_factory=list)
    model: str | None = None
    llm_error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the answer and the numbered sources (``kbsync ask --json``)."""
        return {
            "question": self.question, "language": self.language, "answer": self.text,
            "model": self.model, "llm_error": self.llm_error, "cited": self.cited,
            "sources": [{"n": i, "title": h.title, "url": h.url,
                         "source": h.metadata.get("source", ""), "doc_id": h.doc_id,
                         "chunk_id": h.chunk_id, "score": round(h.score, 6),
                         "given_to_model": i <= self.used, "cited": i in self.cited}
                        for i, h in enumerate(self.hits, 1)],
            "seconds": self.seconds,
        }


def ask(settings: Settings, question: str, *, k: int = 5, source: str | None = None,
        on_text: Callable[[str], None] | None = None,
        llm: LLMClient | None = None) -> Answer:
    """Retrieve the ``k`` best chunks for ``question`` and have the LLM answer from them.

    Args:
        settings: loaded settings (index, ``retrieval.*``, ``llm.*``).
        question: the question, in Russian or English; the answer is asked for in the
            same language.
        k: chunks to retrieve (those that fit the context window are given to the model).
        source: only chunks of this source.
        on_text: when given, the answer is streamed: called with each visible piece
            (never ``<think>`` reasoning).
        llm: a client to use instead of one built from ``llm.*``.

    Returns:
        The :class:`Answer`; with ``hits`` empty the LLM is not asked. When no LLM
        endpoint can be used, ``text`` is ``None`` and ``llm_error`` says why.

    Raises:
        connectors.llm.LLMRequestError: the server refused the request.
        connectors.chroma.EmbeddingModelMismatch: the collection holds another model.
    """
    start = time.perf_counter()
    hits = retrieve(settings, question, k=k, source=source)
    result = Answer(question=question, language=question_language(question), hits=hits,
                    seconds={"retrieval": round(time.perf_counter() - start, 3)})
    if not hits:
        return result
    client = llm or LLMClient(settings.llm_config())
    start = time.perf_counter()
    try:
        messages, result.used = answer_prompt(client, question, hits, language=result.language)
        if on_text is not None:
            reply = client.chat_stream(messages, on_text, purpose="answer")
        else:
            reply = client.chat(messages, purpose="answer")
    except LLMUnavailable as exc:
        result.llm_error = str(exc)
        return result
    finally:
        result.seconds["llm"] = round(time.perf_counter() - start, 3)
        if llm is None:
            client.close()
    result.text = reply.text
    result.model = reply.endpoint
    result.cited = citations(reply.text, result.used)
    return result
