"""States as JSON: a message is encoded once while it stays in the window, with the
same bytes as encoding it anew."""

from __future__ import annotations

import orjson
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from agentserve.core import serialize
from agentserve.core.serialize import dumps, json_text, jsonable


def plainly(value: object) -> bytes:
    def default(item: object) -> object:
        dump = getattr(item, "model_dump", None)
        return dump() if dump else repr(item)

    return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS)


def test_a_window_encodes_as_its_messages_dumps_and_reuses_them() -> None:
    window = [
        HumanMessage("What is 12 * 8? 👋", id="h-1", name="ada"),
        AIMessage("", id="a-1", tool_calls=[{"name": "calculator", "args": {"expression": "12 * 8"}, "id": "c-1"}]),
        ToolMessage("96", tool_call_id="c-1", id="t-1"),
        AIMessage(
            "The answer is 96.", id="a-2", usage_metadata={"input_tokens": 9, "output_tokens": 5, "total_tokens": 14}
        ),
    ]
    state = {"messages": window, "step": 3}
    assert dumps(state) == plainly(state)
    assert json_text(state) == plainly(state).decode()
    reused = {id(m) for m in window} & set(serialize._MESSAGE_JSON.entries)
    assert reused == {id(m) for m in window}
    # A message replaced under the same id is a new object: encoded anew.
    window[-1] = AIMessage("The answer is 97.", id="a-2")
    assert jsonable(state)["messages"][-1]["content"] == "The answer is 97."
    assert dumps(state) == plainly(state)
