"""Chat-completions request bodies without the openai SDK's per-call transform.

Before sending, the SDK walks every request body against its TypedDict type
(`openai._utils._transform`) to rename aliased keys and to format dates and files.
Chat-completions parameters have neither, so for a body of plain JSON values the walk
returns what it was given, yet it costs about 0.2 ms of CPU per message on every call
(5.8 ms for a 24-message window: a third of a plain turn's CPU). `install()` skips it when
both hold, and otherwise leaves the call to the SDK:
- the body's type carries no transformation: no `PropertyInfo` alias or format anywhere
  inside it (decided once per type, by walking the type, failing closed on anything
  it does not know);
- the body is plain JSON (dicts with string keys, lists, strings, numbers, booleans,
  None) once the SDK's omitted parameters are dropped, which the SDK's transform also
  does; pydantic models, dates, files, tuples or iterators go the SDK's way.
The request that goes out is the same bytes either way (tests/test_model_requests.py
records both against a server, for every message shape the agent sends).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import typing_extensions
from openai import NotGiven, Omit
from openai._utils._transform import PropertyInfo
from openai.resources.chat.completions import completions as chat_completions

_SCALARS = frozenset({str, int, float, bool, type(None)})
_SDK_TRANSFORM = chat_completions.async_maybe_transform
_NO_TRANSFORM: dict[object, bool] = {}
# How often each way was taken, so a test can tell that the shortcut still applies.
calls = {"shortcut": 0, "sdk": 0}


def carries_no_transform(type_: object) -> bool:
    """Whether the SDK's transform leaves every plain-JSON value of `type_` as it is."""
    known = _NO_TRANSFORM.get(type_)
    if known is None:
        known = _NO_TRANSFORM[type_] = _walk(type_, set())
    return known


def _walk(type_: object, seen: set[int]) -> bool:
    if id(type_) in seen:  # a recursive type: its other branches decide
        return True
    seen.add(id(type_))
    origin, args = typing_extensions.get_origin(type_), typing_extensions.get_args(type_)
    if origin is typing_extensions.Annotated:
        metadata = getattr(type_, "__metadata__", ())
        if any(isinstance(m, PropertyInfo) and (m.alias is not None or m.format is not None) for m in metadata):
            return False
        return _walk(args[0], seen)
    if origin is Literal:
        return True
    if typing_extensions.is_typeddict(type_):
        hints = typing_extensions.get_type_hints(type_, include_extras=True)
        return all(_walk(hint, seen) for hint in hints.values())
    if isinstance(type_, typing_extensions.TypeAliasType):
        return _walk(type_.__value__, seen)
    if origin is not None:  # Required, NotRequired, unions, lists, iterables, dicts, ...
        return all(_walk(arg, seen) for arg in args)
    # A class is left alone unless its value is a pydantic model, which is not plain JSON.
    # Anything else (an unresolved forward reference, a new typing form) is the SDK's.
    return isinstance(type_, type | TypeVar) or type_ is Any


def is_plain_json(value: object) -> bool:
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is dict:
            for key, inner in item.items():  # type: ignore[attr-defined]
                if type(key) is not str:
                    return False
                if type(inner) not in _SCALARS:
                    pending.append(inner)
        elif kind is list:
            pending.extend(item)  # type: ignore[arg-type]
        elif kind not in _SCALARS:
            return False
    return True


async def maybe_transform(data: object, expected_type: object) -> Any:
    """`openai._utils.async_maybe_transform`, minus the walk where it would change nothing."""
    if type(data) is dict and typing_extensions.is_typeddict(expected_type) and carries_no_transform(expected_type):
        given = {key: value for key, value in data.items() if not isinstance(value, NotGiven | Omit)}
        if is_plain_json(given):
            calls["shortcut"] += 1
            return given
    calls["sdk"] += 1
    return await _SDK_TRANSFORM(data, expected_type)


def install() -> None:
    """Route the async chat-completions client's request bodies through `maybe_transform`
    (idempotent; `create` looks the function up in its module on every call)."""
    setattr(chat_completions, "async_maybe_transform", maybe_transform)  # noqa: B010


def uninstall() -> None:
    setattr(chat_completions, "async_maybe_transform", _SDK_TRANSFORM)  # noqa: B010
