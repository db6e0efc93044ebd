"""Answering from retrieved chunks: the prompt, the question's language, and the
streaming filter that keeps a model's ``<think>`` reasoning off the screen.

Pure functions (no network); used by ``kbsync ask`` (:mod:`flows.ask`) and by the
validation flow's answer step (:mod:`flows.validate`), so both ask the model the same
way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from transforms.evaluation import chunk_body

ANSWER_SYSTEM = (
    "You answer questions using only the numbered context passages given. Cite the "
    "passages you use as [1], [2], ... If the passages do not contain the answer, say that "
    "you cannot find it in the context. Answer in at most three sentences.")
#: Added to :data:`ANSWER_SYSTEM` with the question's language.
LANGUAGE_INSTRUCTION = "Write the answer in {language}, the language of the question."
ANSWER_USER = "Context passages:\n\n{contexts}\n\nQuestion: {question}\nAnswer:"

_CYRILLIC = re.compile(r"[\u0400-\u04FF]")
_LATIN = re.compile(r"[A-Za-z]")


def question_language(text: str) -> str:
    """``"Russian"`` when most letters of ``text`` are Cyrillic, else ``"English"``
    (the two languages kbsync's lexical analysis and answers support)."""
    cyrillic = len(_CYRILLIC.findall(text))
    return "Russian" if cyrillic and cyrillic >= len(_LATIN.findall(text)) else "English"


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk as the model sees it: ``title`` and ``text`` (the chunk
    without its context line)."""

    title: str
    text: str


def format_contexts(passages: Sequence[Passage]) -> list[str]:
    """``[n] (title) text`` for each passage, numbered from 1 in rank order."""
    return [f"[{i}] ({p.title}) {chunk_body(p.text).strip()}" for i, p in enumerate(passages, 1)]


def answer_messages(question: str, contexts: Sequence[str],
                    language: str | None = None) -> list[dict[str, str]]:
    """The chat messages that ask for an answer to ``question`` from ``contexts`` only
    (already numbered by :func:`format_contexts`), in ``language`` when given.

    Call with ``contexts=[]`` to measure the fixed part of the prompt."""
    system = ANSWER_SYSTEM
    if language:
        system += " " + LANGUAGE_INSTRUCTION.format(language=language)
    return [{"role": "system", "content": system},
            {"role": "user", "content": ANSWER_USER.format(
                contexts="\n\n".join(contexts) or "(none)", question=question)}]


_REASONING_MODEL = re.compile(r"(^|[^a-z])(r1|qwq|reason|think)", re.IGNORECASE)


def is_reasoning_model(model: str) -> bool:
    """Whether ``model``'s name says it writes ``<think>`` reasoning first (DeepSeek-R1
    and its distills, QwQ, ``*-thinking``/``*-reasoning`` models)."""
    return bool(_REASONING_MODEL.search(model))


class ThinkFilter:
    """Streams a reply's text without its ``<think>...</think>`` reasoning.

    :meth:`feed` takes each streamed piece and returns what may be shown now; :meth:`end`
    returns the rest when the stream ends. Tags split across pieces are recognised (a
    possible tag start is held back until it is decided).

    With ``hold_until_close`` (a reasoning model) nothing is shown before a ``</think>``
    has been seen or the stream has ended: servers that put the opening ``<think>`` in
    the prompt template (DeepSeek-R1's newer template) stream reasoning with only a
    closing tag, and it must not reach the screen. The text shown over a whole stream
    equals :func:`transforms.replies.strip_think` of the whole reply, up to surrounding
    whitespace.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, hold_until_close: bool = False) -> None:
        self._raw = ""
        self._pos = 0            # raw text before this index is decided
        self._inside = False     # inside a <think> block
        self._holding = hold_until_close
        self._started = False    # shown anything yet (leading whitespace is dropped)

    def _show(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text

    def feed(self, piece: str) -> str:
        """The part of the reply so far that can be shown now."""
        self._raw += piece
        if self._holding:
            lower = self._raw.lower()
            close = lower.rfind(self.CLOSE)
            if close < 0:
                return ""
            # everything up to the last closing tag was reasoning
            self._holding = False
            self._pos = close + len(self.CLOSE)
            self._inside = False
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        out: list[str] = []
        raw, lower = self._raw, self._raw.lower()
        while self._pos < len(raw):
            if self._inside:
                at = lower.find(self.CLOSE, self._pos)
                if at >= 0:
                    self._pos, self._inside = at + len(self.CLOSE), False
                    continue
                # skip the reasoning; keep a possible split closing tag for the next piece
                self._pos = len(raw) if final else max(self._pos,
                                                       len(raw) - len(self.CLOSE) + 1)
                break
            found = [(at, tag) for tag in (self.OPEN, self.CLOSE)
                     if (at := lower.find(tag, self._pos)) >= 0]
            if found:
                at, tag = min(found)
                out.append(raw[self._pos:at])
                # a lone closing tag (reasoning already shown unless held) is dropped
                self._pos, self._inside = at + len(tag), tag == self.OPEN
                continue
            end = len(raw)
            if not final:  # hold back a possible split tag
                for n in range(min(len(self.CLOSE) - 1, end - self._pos), 0, -1):
                    tail = lower[end - n:]
                    if self.OPEN.startswith(tail) or self.CLOSE.startswith(tail):
                        end -= n
                        break
            out.append(raw[self._pos:end])
            self._pos = end
            break
        return self._show("".join(out))

    def end(self) -> str:
        """What is left to show when the stream has ended."""
        if self._holding:  # no closing tag: a non-reasoning reply, or cut off in <think>
            self._holding = False
            return self._advance(final=True)
        return self._advance(final=True)
