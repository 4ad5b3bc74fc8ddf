"""User errors, UTF-8 text reading that names file and line, and the one wrapper every CLI runs under.

* :class:`UserError` is the base of every error a user can fix (bad config, data, checkpoint, request,
  release): its message names the file and record. The project's specific errors (``ConfigError``,
  ``StageError``, ``BadSample``, ``ConversionError``, ``BatchError`` ...) derive from it.
* :func:`iter_text_lines` / :func:`read_text` decode UTF-8 and, on bad bytes, name the file, the line
  and the byte offset (:class:`NotUtf8`) instead of a bare ``UnicodeDecodeError``.
* :func:`cli_errors` wraps an entry point's ``main(argv)``: a user error prints one line
  (``prog: error: FILE:LINE: ...``) and returns 2; ``--verbose`` also prints the traceback. Anything
  else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path


class UserError(Exception):
    """An error in something the user gave us (file, record, argument); the message says where."""


class NotUtf8(UserError, ValueError):
    """Text that is not UTF-8; ``where`` is ``FILE:LINE`` and ``offset`` the bad byte's file offset."""

    def __init__(self, path: str | Path, line: int, offset: int, byte: int):
        self.path, self.line, self.offset, self.byte = str(path), line, offset, byte
        self.where = f"{path}:{line}"
        super().__init__(f"{self.where}: not UTF-8 text (byte 0x{byte:02x} at byte offset {offset})")


def decode_line(raw: bytes, path: str | Path, line: int, line_offset: int) -> str:
    """One line's bytes as text, or :class:`NotUtf8` naming the line and the bad byte's offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8(path, line, line_offset + e.start, raw[e.start]) from None


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str | NotUtf8]]:
    """``(line number, text)`` for every line of a UTF-8 file; a line that does not decode yields its
    :class:`NotUtf8` instead of the text, so a reader can raise it or skip and count it."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, decode_line(raw, path, n, offset)
            except NotUtf8 as e:
                yield n, e
            offset += len(raw)


def read_text(path: str | Path) -> str:
    """The whole file as UTF-8 text; :class:`NotUtf8` names the first bad line and byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise NotUtf8(path, line, e.start, data[e.start]) from None


# ------------------------------------------------------------------------------------------ CLIs
def user_message(err: BaseException) -> str | None:
    """The one-line message for an error the user caused, or None for a bug (traceback stays)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        name = f"{err.filename}: " if err.filename else ""
        return f"{name}{err.strerror or err}"
    return None


def as_user_error(err: Exception) -> UserError:
    """``err`` itself when it is a user error, else a :class:`UserError` with its message (for an entry
    point that knows every ``ValueError`` / ``OSError`` of a call is about what the user gave it)."""
    return err if isinstance(err, UserError) else UserError(user_message(err) or str(err))


def cli_errors(prog: str) -> Callable:
    """Decorator for ``main(argv=None, ...)``: user errors -> one line on stderr and exit code 2
    (``--verbose`` in argv adds the traceback); everything else propagates unchanged."""

    def deco(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None, *args, **kwargs) -> int:
            given = sys.argv[1:] if argv is None else list(argv)
            try:
                return main(argv, *args, **kwargs)
            except Exception as e:
                msg = user_message(e)
                if msg is None:
                    raise
                if "--verbose" in given:
                    traceback.print_exc(file=sys.stderr)
                first, *rest = msg.splitlines() or [""]
                # the entry point's own error line (a CLI boundary, not library logging: it must show
                # even when logging is unconfigured or quietened)
                sys.stderr.write("".join([f"{prog}: error: {first}\n", *(f"  {line}\n" for line in rest)]))
                return 2

        return wrapped

    return deco


def read_jsonl_objects(path: str | Path) -> list[tuple[str, object]]:
    """``[("FILE:LINE", value)]`` of a JSONL file (blank lines skipped); a line that is not UTF-8 or not
    JSON raises a :class:`UserError` naming the file and line."""
    import json

    out = []
    for n, line in iter_text_lines(path):
        if isinstance(line, NotUtf8):
            raise line
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except ValueError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
    return out
