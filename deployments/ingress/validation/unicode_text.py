"""Text that is not text: a lone UTF-16 surrogate (`"\\ud800"`), which JSON allows and UTF-8
cannot encode. It would fail inside the pipeline's tokenizer (and its batch with it, design
note 10), or in writing the error message that quotes it, so a body holding one anywhere is
a 400 naming the field, before anything else reads the body."""

from __future__ import annotations

from deployments.ingress.errors import invalid_request


def unencodable_field(value: object) -> str | None:
    """The path (`prompt`, `lora.0.name`) of the first string in a parsed JSON body or form
    that is not valid Unicode text (a lone UTF-16 surrogate such as `"\\ud800"`, which JSON
    allows and UTF-8 cannot encode), or None; `body` when a key itself is not text.

    Walks with an explicit stack, not recursion: a body may nest as deep as the JSON parser
    allows, and must not exhaust Python's stack here."""
    pending: list[tuple[object, str]] = [(value, "")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return path or "body"
        elif isinstance(item, dict):
            if not all(_is_text(str(key)) for key in item):
                return "body"  # the key itself cannot be written back in an error message
            children = [
                (child, f"{path}.{key}" if path else str(key)) for key, child in item.items()
            ]
            pending.extend(reversed(children))
        elif isinstance(item, list):
            children = [(child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(item)]
            pending.extend(reversed(children))
    return None


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refuse_unencodable(fields: object) -> None:
    """400 for text that cannot be encoded as UTF-8: it would fail inside the pipeline's
    tokenizer (and its batch with it), or in writing the error message that quotes it."""
    if (param := unencodable_field(fields)) is not None:
        raise invalid_request(
            f"Invalid value for '{param}': it is not valid Unicode text (a lone surrogate).",
            param=None if param == "body" else param,
            code="invalid_value",
        )
