"""The shape of the files FanAOI reads back (registry log and cards, DVC files, the ingest index).

Each reader checks what it parsed against a typed dict, validated by pydantic as params
are, so a hand-edited or damaged file is one error naming the file, the key and the fix,
never an ``AttributeError`` three calls later. A shape names only the keys its reader
uses (other keys pass); a key it does not mark ``Required`` may be absent, not null.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError

from tasks.errors import FanaoiError, printable

# JSON types as written: "0.5" is not a number, 5 is not a time.
STRICT = ConfigDict(strict=True)


class BadFile(FanaoiError):
    """A file FanAOI wrote no longer has the shape its writer gives it."""


def _iso_time(text: str) -> str:
    datetime.fromisoformat(text)  # its ValueError becomes the validation error
    return text


IsoTime = Annotated[str, AfterValidator(_iso_time)]


def checked(shape: type, value: Any, where: str, fix: str, error: type[FanaoiError] = BadFile) -> Any:
    """``value`` itself when it has ``shape``; else ``error`` naming ``where`` (file or file:line), the key, ``fix``."""
    try:
        _adapter(shape).validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        found = f"{key}: {first['msg']}" if key else first["msg"]
        raise error(f"{where}: {printable(found)}; {fix}") from None
    return value


@functools.cache  # building one costs more than validating a line with it (ingest indexes are long)
def _adapter(shape: type) -> TypeAdapter:
    return TypeAdapter(shape)
