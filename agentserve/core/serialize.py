"""LangChain and LangGraph objects as plain JSON, the way LangGraph Server clients
read them: messages as their `model_dump()`, interrupts as `{value, id}`."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from typing import Any

import orjson
from langgraph.types import Interrupt
from psycopg.types.json import Jsonb
from pydantic import BaseModel


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, Interrupt):
        return {"value": value.value, "id": value.id}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, uuid.UUID | datetime.date):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    # Anything else (a callback handler, a function) is shown by name, never raised on.
    return repr(value)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)


def jsonable(value: Any) -> Any:
    """The value as plain dicts, lists and scalars."""
    return orjson.loads(dumps(value))


class JsonText(str):
    """A value already serialized to JSON: stored and sent as it is. A turn's final
    state is turned into JSON once, not once per place it goes."""


def json_text(value: Any) -> JsonText:
    return JsonText(dumps(value).decode())


def json_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, JsonText) else dumps(value)


def as_jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=str) if isinstance(value, JsonText) else Jsonb(value)


def plain(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, JsonText) else value
