"""LangChain and LangGraph objects as plain JSON, the way LangGraph Server clients
read them: messages as their `model_dump()`, interrupts as `{value, id}`."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from langchain_core.messages import BaseMessage
from langgraph.types import Interrupt
from psycopg.types.json import Jsonb
from pydantic import BaseModel


class PerObject:
    """Bytes computed once per object, for objects that are replaced rather than
    changed in place, as a thread's messages are (add_messages swaps a message for
    a new one with its id). Kept by identity: an entry holds its object, so the id
    cannot be reused while the entry lives; the oldest quarter goes when full."""

    def __init__(self, compute: Callable[[Any], bytes], size: int = 8192) -> None:
        self.compute, self.size = compute, size
        self.entries: dict[int, tuple[Any, bytes]] = {}

    def __call__(self, obj: Any) -> bytes:
        known = self.entries.get(id(obj))
        if known is not None and known[0] is obj:
            return known[1]
        data = self.compute(obj)
        if len(self.entries) >= self.size:
            for key in list(itertools.islice(self.entries, self.size // 4)):
                del self.entries[key]
        self.entries[id(obj)] = (obj, data)
        return data


def _message_json(message: BaseMessage) -> bytes:
    return orjson.dumps(message.model_dump(), default=_default, option=orjson.OPT_NON_STR_KEYS)


# A turn's state is its window of messages, nearly all of them in the last state too.
_MESSAGE_JSON = PerObject(_message_json)


def _default(value: Any) -> Any:
    if isinstance(value, BaseMessage):
        return orjson.Fragment(_MESSAGE_JSON(value))
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
