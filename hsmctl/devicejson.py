"""JSON that came from a device (or a signed file): parsed in one place, failing one way.

A device may be broken or hostile, and whatever it sends must end as a verdict on the
device: :class:`~hsmctl.errors.IntegrityError` (exit 3) naming the appliance and the
reply, never an exception of the ``json`` module that the CLI can only report as
"unexpected". ``json.loads`` alone lets through, or fails with the wrong error, on:

* invalid UTF-8 (``UnicodeDecodeError``);
* deep nesting: the C parser recurses once per level, so 200 000 ``[`` raise
  ``RecursionError``, and *where* it is raised depends on how deep the caller's stack
  already is. :func:`too_deep` bounds the depth on the bytes before anything is parsed,
  so a reply is refused or parsed the same way from every call site;
* integers of more than 4300 digits (a plain ``ValueError``, not ``JSONDecodeError``);
* duplicate members and ``NaN``/``Infinity``: accepted by Python, but parsers disagree
  on them, so one reply could mean one thing to us and another to ``jq``;
* ``\\ud800`` and other lone surrogates: valid JSON escapes for no character, which
  later fail wherever the string is encoded (printed, written, hashed).

Device replies and log records are shallow (a record is three levels deep), so
:data:`MAX_DEPTH` costs nothing legitimate and keeps a hostile line cheap to refuse.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from hsmctl.errors import IntegrityError

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted from a device (the outer value is 1)."""

# A string, possessive so that hostile input cannot make it backtrack; an unterminated
# one runs to the end (the parser rejects it later; here it only must not count).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


class DeviceJSONError(ValueError):
    """Internal: why the data is not acceptable JSON (see :func:`parse`)."""


def too_deep(data: bytes) -> int:
    """How deeply arrays and objects nest in ``data`` if that is more than ``MAX_DEPTH``,
    else 0; without parsing, in time linear in ``len(data)``.

    The depth is the most brackets open at once outside strings, which bounds how deep
    ``json.loads`` recurses on any input, valid or not (it stops at the first error). The
    common case costs two ``count`` calls: no more opening brackets than ``MAX_DEPTH``
    anywhere means no deeper nesting.
    """
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return 0
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = max(accumulate(map(_STEP.__getitem__, brackets), initial=0))
    return depth if depth > MAX_DEPTH else 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DeviceJSONError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise DeviceJSONError(f"non-JSON constant {name}")


def parse(data: bytes | str) -> Any:
    """Parse strictly, or raise :class:`DeviceJSONError` (a ValueError) saying why.

    For callers that judge a failure themselves (the log verifier turns it into a
    violation); everyone else calls :func:`loads`.
    """
    try:
        if isinstance(data, str):
            text, raw = data, data.encode("utf-8")  # lone surrogates cannot be encoded
        else:
            text, raw = data.decode("utf-8"), data
    except UnicodeError:
        raise DeviceJSONError("not UTF-8") from None
    if depth := too_deep(raw):
        raise DeviceJSONError(f"nested {depth} levels deep, more than {MAX_DEPTH}")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except DeviceJSONError:
        raise
    except json.JSONDecodeError as exc:
        raise DeviceJSONError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number; RecursionError: never
        raise DeviceJSONError(str(exc) or type(exc).__name__) from None
    if b"\\u" in raw:  # only an escape can make a lone surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DeviceJSONError("a lone surrogate (\\ud800-\\udfff) is no character") from None
    return value


def loads(data: bytes | str, what: str, host: str | None = None) -> Any:
    """Parse ``what`` (e.g. ``"reply to 'hsm show'"``) that ``host`` sent; anything that
    is not strict JSON is an IntegrityError (exit 3) naming both."""
    try:
        return parse(data)
    except DeviceJSONError as exc:
        where = f"{host}: " if host else ""
        raise IntegrityError(
            f"{where}{what}: not valid JSON ({exc})",
            detail={"appliance": host, "what": what} if host else {"what": what},
        ) from None


def loads_object(data: bytes | str, what: str, host: str | None = None) -> dict[str, Any]:
    """:func:`loads` for replies that must be a JSON object (most are)."""
    value = loads(data, what, host)
    if not isinstance(value, dict):
        where = f"{host}: " if host else ""
        raise IntegrityError(
            f"{where}{what}: not a JSON object",
            detail={"appliance": host, "what": what} if host else {"what": what},
        )
    return value
