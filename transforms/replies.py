"""Pure handling of an LLM's replies and prompts: the reasoning it writes before its
answer (``<think>``), the JSON in a reply, token estimates of a prompt, and the JSON
schema a server is given. No network (the client is :mod:`connectors.llm`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def strip_think(text: str | None) -> str:
    """``text`` without the reasoning a model writes before its answer.

    Removes every ``<think>...</think>`` block; text before a lone ``</think>`` (the
    opening tag was in the prompt template, as with Ollama's DeepSeek-R1 template); and
    everything after an unclosed ``<think>`` (the reply was cut off while reasoning,
    so there is no answer). Surrounding whitespace is stripped.
    """
    if not text:
        return ""
    out = _THINK_BLOCK.sub("", text)
    lower = out.lower()
    if "</think>" in lower:
        out = out[lower.rindex("</think>") + len("</think>"):]
        lower = out.lower()
    if "<think>" in lower:
        out = out[:lower.index("<think>")]
    return out.strip()


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def parse_json_reply(text: str) -> Any:
    """The first JSON object in a model's reply (else the first array).

    Tolerates reasoning (``<think>``), code fences, prose before or after the JSON,
    a trailing comma before a closing bracket, and raw newlines inside strings. Raises ``ValueError`` when there is
    no valid JSON value in ``text``.
    """
    body = strip_think(text)
    candidates = [body] + [m.group(1) for m in _FENCE.finditer(body)]
    decoder = json.JSONDecoder(strict=False)  # strict=False: control characters in strings
    arrays: list[Any] = []
    for candidate in candidates:
        candidate = candidate.strip()
        for variant in (candidate, re.sub(r",\s*([}\]])", r"\1", candidate)):
            try:
                value = json.loads(variant, strict=False)
                if isinstance(value, dict):
                    return value
                if isinstance(value, list):
                    arrays.append(value)
            except ValueError:
                pass
            # an object first: a "[1]" inside prose (or a cut-off object) is not the reply
            for opening in ("{", "["):
                for match in re.finditer(re.escape(opening), variant):
                    try:
                        value, _ = decoder.raw_decode(variant, match.start())
                    except ValueError:
                        continue
                    if isinstance(value, dict):
                        return value
                    if isinstance(value, list):
                        arrays.append(value)
                        break
    if arrays:
        return arrays[0]
    raise ValueError(f"no JSON object in the reply ({len(body)} characters): {body[:120]!r}")


def estimate_tokens(text: str) -> int:
    """A conservative token count for any model's tokenizer: UTF-8 bytes / 3.

    English BPE vocabularies average about 4 characters per token; Cyrillic takes two
    bytes per character and about 2-3 characters per token. Over-counting only drops
    context a little early; under-counting would make the server cut the prompt.
    """
    return math.ceil(len(text.encode("utf-8")) / 3)


def message_tokens(messages: Sequence[Mapping[str, str]],
                   count: Callable[[str], int] = estimate_tokens) -> int:
    """Estimated prompt tokens of chat ``messages`` (content plus ~4 per message)."""
    return sum(count(m.get("content", "")) + 4 for m in messages) + 2


#: Schema keys left out of what servers see. Grammar-based servers (llama.cpp) expand
#: upper length bounds into bounded repetitions that make sampling very slow (a
#: ``maxLength: 600`` string took 14 s instead of 0.7 s with SmolLM2); the bounds are
#: still checked here when the reply is validated.
_SERVER_SCHEMA_DROP = {"$defs", "title", "maxLength", "maxItems"}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with ``$ref``s to ``$defs`` replaced by the definitions (pydantic puts
    nested models in ``$defs``; grammar converters and small models do better without),
    and without titles and upper length bounds (:data:`_SERVER_SCHEMA_DROP`)."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.split("/")[-1]])
            return {k: walk(v) for k, v in node.items() if k not in _SERVER_SCHEMA_DROP}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def json_schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of a pydantic model as servers are given it: flat (no ``$ref``),
    without titles and upper length bounds."""
    return _inline_refs(model.model_json_schema())
