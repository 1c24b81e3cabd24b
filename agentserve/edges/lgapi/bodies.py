"""Request bodies of the LangGraph Server API, validated so that a bad field is a
422 naming it. Unknown fields that clients send are ignored, as the reference
server does; fields we cannot honour are refused by name."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentserve.decisions import checked_decision
from agentserve.messages import TurnInput

STREAM_MODES = ("values", "updates", "messages-tuple", "events", "custom", "debug")
MAX_METADATA_KEYS = 64


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CommandBody(Lenient):
    resume: Any = None
    update: Any = None
    goto: str | list[str] | None = None

    @field_validator("resume")
    @classmethod
    def _understood_decision(cls, value: Any) -> Any:
        """The only pause of this graph is a refund approval: its answer is checked
        here, so a malformed one is a 422 and not a run."""
        return checked_decision(value)

    @field_validator("goto")
    @classmethod
    def _goto_none_when_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        return value or None  # RemoteGraph sends `goto: []` for "no goto"


class Checkpoint(Lenient):
    checkpoint_id: str | None = Field(default=None, max_length=100)
    checkpoint_ns: str = ""


def messages_of(value: Any) -> dict[str, Any] | None:
    """An input holds only the caller's new messages (the agent writes its own),
    checked by the same rules as a LangServe turn's."""
    if value is None or value == {}:
        return value
    if not isinstance(value, dict) or set(value) != {"messages"}:
        raise ValueError("input must be {'messages': [{'role': 'user', 'content': '...'}]} and nothing else")
    try:
        turn = TurnInput.model_validate(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"input.{where}: {first['msg']}") from exc
    return {"messages": [m.model_dump() for m in turn.messages or []]}


class RunCreate(Lenient):
    assistant_id: str = Field(min_length=1, max_length=200)
    input: Any = None
    command: CommandBody | None = None
    stream_mode: str | list[str] = Field(default_factory=lambda: ["values"])
    stream_subgraphs: bool = False
    stream_resumable: bool = False
    metadata: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    checkpoint: Checkpoint | None = None
    checkpoint_id: str | None = Field(default=None, max_length=100)
    interrupt_before: str | list[str] | None = None
    interrupt_after: str | list[str] | None = None
    multitask_strategy: Literal["reject", "interrupt", "rollback", "enqueue"] = "enqueue"
    if_not_exists: Literal["reject", "create"] = "reject"
    on_disconnect: Literal["cancel", "continue"] = "continue"
    on_completion: Literal["delete", "keep"] = "delete"
    webhook: str | None = Field(default=None, max_length=2000)

    @field_validator("stream_mode")
    @classmethod
    def _known_modes(cls, value: str | list[str]) -> list[str]:
        modes = [value] if isinstance(value, str) else value
        unknown = [m for m in modes if m not in STREAM_MODES]
        if unknown:
            raise ValueError(f"stream mode {unknown[0]!r} is not served; use any of {', '.join(STREAM_MODES)}")
        return list(dict.fromkeys(modes)) or ["values"]

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata may hold at most {MAX_METADATA_KEYS} keys")
        return value

    @model_validator(mode="after")
    def _input_unless_command(self) -> RunCreate:
        if self.interrupt_before or self.interrupt_after:
            raise ValueError("interrupt_before/interrupt_after are not supported by this server")
        if self.command is not None and (self.command.resume, self.command.update, self.command.goto) == (
            None,
            None,
            None,
        ):
            self.command = None
        if self.command is None:
            self.input = messages_of(self.input)
        return self

    def kwargs(self) -> dict[str, Any]:
        """The run as it is stored and read back by whichever worker runs it."""
        checkpoint = self.checkpoint.model_dump() if self.checkpoint else None
        if checkpoint is None and self.checkpoint_id:
            checkpoint = {"checkpoint_id": self.checkpoint_id, "checkpoint_ns": ""}
        return {
            "input": None if self.command else self.input,
            "command": self.command.model_dump() if self.command else None,
            "stream_mode": self.stream_mode,
            "stream_subgraphs": self.stream_subgraphs,
            "stream_resumable": self.stream_resumable,
            "checkpoint": checkpoint,
            "on_disconnect": self.on_disconnect,
            "on_completion": self.on_completion,
            "config": {},
            "metadata": self.metadata or {},
        }


class ThreadCreate(Lenient):
    thread_id: str | None = Field(default=None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    if_exists: Literal["raise", "do_nothing"] = "raise"


class ThreadPatch(Lenient):
    metadata: dict[str, Any] = Field(default_factory=dict)


class ThreadSearch(Lenient):
    metadata: dict[str, Any] = Field(default_factory=dict)
    values: dict[str, Any] | None = None
    status: Literal["idle", "busy", "interrupted", "error"] | None = None
    ids: list[str] | None = Field(default=None, max_length=1000)
    limit: int = Field(default=10, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)
    sort_by: Literal["thread_id", "status", "created_at", "updated_at", "state_updated_at"] = "updated_at"
    sort_order: Literal["asc", "desc"] = "desc"


class HistoryRequest(Lenient):
    limit: int = Field(default=10, ge=1, le=1000)
    before: Checkpoint | str | None = None
    metadata: dict[str, Any] | None = None
    checkpoint: Checkpoint | None = None

    def before_id(self) -> str | None:
        return self.before if isinstance(self.before, str) else (self.before.checkpoint_id if self.before else None)


class StateUpdate(Lenient):
    values: dict[str, Any] | list[dict[str, Any]] | None = None
    as_node: str | None = Field(default=None, max_length=200)
    checkpoint: Checkpoint | None = None
    checkpoint_id: str | None = Field(default=None, max_length=100)


class CheckpointRequest(Lenient):
    checkpoint: Checkpoint
    subgraphs: bool = False


class AssistantSearch(Lenient):
    graph_id: str | None = None
    name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    limit: int = Field(default=10, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)


class CancelMany(Lenient):
    thread_id: str | None = None
    run_ids: list[str] | None = None
    status: Literal["pending", "running", "all"] | None = None
