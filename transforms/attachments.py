"""Text of a text-like file attachment (txt, md, csv, html, pdf, ...). Pure: bytes in, text out.

PDF text is extracted with pypdf (``PdfReader(...).pages[i].extract_text()``,
https://pypdf.readthedocs.io/en/stable/user/extract-text.html); HTML goes through the
storage-format converter (plain HTML is a subset of it); everything else must be UTF-8.
"""

from __future__ import annotations

import io
from pathlib import PurePosixPath

from transforms.storage_format import storage_to_markdown

#: File extension -> document format of the extracted text.
TEXT_LIKE: dict[str, str] = {
    ".txt": "text", ".text": "text", ".log": "text", ".csv": "text", ".tsv": "text",
    ".md": "markdown", ".markdown": "markdown", ".rst": "text", ".json": "text",
    ".yaml": "text", ".yml": "text", ".xml": "text", ".html": "markdown",
    ".htm": "markdown", ".pdf": "text",
}
#: Media types accepted when the file name has no known extension.
TEXT_MEDIA_TYPES: dict[str, str] = {
    "text/plain": ".txt", "text/markdown": ".md", "text/csv": ".csv", "text/html": ".html",
    "application/pdf": ".pdf", "application/json": ".json", "text/xml": ".xml",
    "application/xml": ".xml",
}


class AttachmentTextError(ValueError):
    """The file cannot be read as text (not UTF-8, a broken or encrypted PDF)."""


def attachment_kind(filename: str, media_type: str | None = None) -> str | None:
    """The extension that decides how ``filename`` is read (``".pdf"``, ``".md"``, ...),
    or ``None`` when the attachment is not text-like (images, archives, office files)."""
    suffix = PurePosixPath(filename.lower()).suffix
    if suffix in TEXT_LIKE:
        return suffix
    return TEXT_MEDIA_TYPES.get((media_type or "").split(";")[0].strip().lower())


def attachment_text(filename: str, data: bytes, media_type: str | None = None) -> tuple[str, str]:
    """``(text, format)`` of an attachment; ``format`` is ``"markdown"`` or ``"text"``.

    Raises:
        AttachmentTextError: not a text-like type, text that is not UTF-8, or a PDF
            pypdf cannot read.
    """
    kind = attachment_kind(filename, media_type)
    if kind is None:
        raise AttachmentTextError(f"not a text-like attachment ({media_type or 'unknown type'})")
    if kind == ".pdf":
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError

        try:
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted:
                raise AttachmentTextError("encrypted PDF")
            pages = [(page.extract_text() or "").strip() for page in reader.pages]
        except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
            raise AttachmentTextError(f"unreadable PDF ({type(exc).__name__}: {exc})") from None
        return "\n\n".join(p for p in pages if p), "text"
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise AttachmentTextError(f"not valid UTF-8 (byte {exc.start})") from None
    if kind in (".html", ".htm"):
        return storage_to_markdown(text), "markdown"
    return text, TEXT_LIKE[kind]
