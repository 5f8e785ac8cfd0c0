"""The one exception type for mistakes a user can fix, and how foreign errors become one line."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message is one line naming the file and the fix."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), at most `limit` characters.

    Library errors (GDAL, ONNX, zip) are often several lines long; a user needs the first one only.
    """
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
