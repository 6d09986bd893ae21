"""What every benchmark script shares: rewriting its generated block in a doc."""

from __future__ import annotations

from pathlib import Path


def replace_generated_block(
    doc: Path, start: str, end: str, block: str, intro_if_new: str = "", at_top: bool = False
) -> None:
    """Put `block` (which begins with `start` and ends with `end`) in place of the text between
    those markers in `doc`; when the markers are not there yet, append it (after `intro_if_new`),
    or with `at_top` put it right under the document's title (its first line, if a `# ` heading)."""
    text = doc.read_text() if doc.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    elif at_top:
        title, sep, body = text.partition("\n")
        if not title.startswith("# "):
            title, sep, body = "", "", text
        head = title + "\n\n" if title else ""
        text = head + intro_if_new + block + "\n\n" + body.lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + intro_if_new + block + "\n"
    doc.write_text(text)
