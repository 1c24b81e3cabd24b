"""What a caller may send as a turn, and how both message dialects become real messages."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agentserve.decisions import checked_decision

MAX_MESSAGES_PER_TURN = 20
EITHER_MESSAGES_OR_RESUME = 'send either "messages" (a new turn) or "resume" (a decision on a pending action)'
# OpenAI's roles and LangChain's types for what a caller is allowed to say.
CALLER_ROLES = {"user": "human", "human": "human"}
SEND_THIS = "send {'role': 'user', 'content': '...'}, {'type': 'human', 'content': '...'} or ['human', '...']"


def as_human_message_dict(index: int, value: Any) -> Any:
    """Accept a LangChain dict, an OpenAI dict or a (type, content) pair; refuse every other speaker, since
    the agent writes its own AI and tool messages and the server owns the system prompt."""
    if isinstance(value, HumanMessage):
        return value
    if isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], str):
        value = {"type": value[0], "content": value[1]}  # LangChain's ("human", "text") form
    if not isinstance(value, dict):
        raise ValueError(f"messages[{index}] must be an object: {SEND_THIS}")
    speaker = value.get("type", value.get("role"))
    if speaker not in CALLER_ROLES:
        raise ValueError(f"messages[{index}] has type/role {speaker!r}, which callers cannot send: {SEND_THIS}")
    body = {k: v for k, v in value.items() if k not in ("role", "type")}
    return {**body, "type": "human"}


class TurnInput(BaseModel):
    """One turn of a conversation: the caller's new messages, or the decision on a
    pending action. The thread is named in `config.configurable.thread_id`; the
    server keeps the history."""

    model_config = ConfigDict(extra="forbid")

    messages: list[HumanMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES_PER_TURN)
    resume: Any = Field(
        default=None,
        description='The decision on the pending refund: {"approved": true} or {"approved": false, "reason": "..."}'
        ' (also accepted: [{"type": "accept"}] and {"decisions": [{"type": "approve"}]}).',
    )

    @model_validator(mode="before")
    @classmethod
    def _messages_or_resume(cls, value: Any) -> Any:
        if isinstance(value, dict) and (value.get("messages") is None) == (value.get("resume") is None):
            raise ValueError(EITHER_MESSAGES_OR_RESUME)
        return value

    @field_validator("resume")
    @classmethod
    def _understood_decision(cls, value: Any) -> Any:
        return checked_decision(value)

    @field_validator("messages", mode="before")
    @classmethod
    def _accept_both_dialects(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [as_human_message_dict(index, item) for index, item in enumerate(value)]

    @field_validator("messages")
    @classmethod
    def _refuse_empty_content(cls, value: list[HumanMessage] | None) -> list[HumanMessage] | None:
        for index, message in enumerate(value or []):
            if not message.content:
                raise ValueError(f"messages[{index}].content is empty")
        return value
