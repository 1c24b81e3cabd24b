"""Graph tests: the ReAct loop with a scripted model (no network, no database)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver

from agent import INTERRUPTED_TOOL_RESULT, STEP_BUDGET_ANSWER, build_graph, context_window


class ScriptedModel(BaseChatModel):
    """Answers with the next scripted message and records what it was sent."""

    script: list[AIMessage]
    seen: list[list[BaseMessage]] = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedModel:  # type: ignore[override]
        return self

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.seen.append(list(messages))
        reply = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return ChatResult(generations=[ChatGeneration(message=reply.model_copy())])


def tool_call(expression: str, call_id: str = "call-1") -> AIMessage:
    return AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": expression}, "id": call_id}])


def config(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}, "recursion_limit": 12}


async def test_tool_loop_calls_the_calculator_and_answers() -> None:
    model = ScriptedModel(script=[tool_call("12 * 8"), AIMessage("The answer is 96.")], seen=[])
    graph = build_graph(model, InMemorySaver())
    result = await graph.ainvoke({"messages": [HumanMessage("What is 12 * 8?")]}, config("t"))
    tool_results = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.content for m in tool_results] == ["96"]
    assert result["messages"][-1].content == "The answer is 96."
    # The second model call saw the tool's result.
    assert isinstance(model.seen[1][-1], ToolMessage)


async def test_calculator_refusal_goes_back_to_the_model_as_a_tool_error() -> None:
    model = ScriptedModel(script=[tool_call("9**9**9"), AIMessage("Too big.")], seen=[])
    graph = build_graph(model, InMemorySaver())
    result = await graph.ainvoke({"messages": [HumanMessage("What is 9**9**9?")]}, config("t"))
    tool_result = next(m for m in result["messages"] if isinstance(m, ToolMessage))
    assert str(tool_result.content).startswith("Error: exponent")


async def test_step_budget_ends_with_a_polite_answer_not_an_error() -> None:
    model = ScriptedModel(script=[tool_call("1 + 1")], seen=[])  # calls the tool forever
    graph = build_graph(model, InMemorySaver())
    result = await graph.ainvoke({"messages": [HumanMessage("loop")]}, config("t"))
    assert result["messages"][-1].content == STEP_BUDGET_ANSWER
    assert not result["messages"][-1].tool_calls
    assert len(model.seen) <= 6


async def test_second_turn_sees_the_first_through_the_checkpointer() -> None:
    model = ScriptedModel(script=[AIMessage("Nice to meet you, Ada."), AIMessage("Your name is Ada.")], seen=[])
    graph = build_graph(model, InMemorySaver())
    await graph.ainvoke({"messages": [HumanMessage("my name is Ada")]}, config("t"))
    await graph.ainvoke({"messages": [HumanMessage("what is my name")]}, config("t"))
    assert [m.content for m in model.seen[1] if isinstance(m, HumanMessage)] == ["my name is Ada", "what is my name"]


def test_context_window_never_opens_on_a_tool_result() -> None:
    history: list[Any] = [
        HumanMessage("q1"),
        tool_call("1+1"),
        ToolMessage("2", tool_call_id="call-1"),
        AIMessage("2"),
        HumanMessage("q2"),
        AIMessage("a2"),
    ]
    window = context_window(history, limit=4)
    assert window == history[3:]
    assert not isinstance(context_window(history, limit=5)[0], ToolMessage)


def test_context_window_answers_a_tool_call_left_without_result() -> None:
    history: list[Any] = [HumanMessage("q1"), tool_call("1+1"), HumanMessage("q2")]
    window = context_window(history, limit=10)
    assert isinstance(window[2], ToolMessage)
    assert window[2].content == INTERRUPTED_TOOL_RESULT
    assert window[2].tool_call_id == "call-1"
    assert window[3] == history[2]


async def test_malformed_and_unknown_tool_calls_go_back_to_the_model_as_errors() -> None:
    bad_json = AIMessage(
        "",
        invalid_tool_calls=[
            {"name": "calculator", "args": "{12 *", "id": "bad-1", "error": "not JSON", "type": "invalid_tool_call"}
        ],
    )
    unknown = AIMessage("", tool_calls=[{"name": "launch_rockets", "args": {}, "id": "bad-2"}])
    model = ScriptedModel(script=[bad_json, unknown, AIMessage("Sorry.")], seen=[])
    graph = build_graph(model, InMemorySaver())
    result = await graph.ainvoke({"messages": [HumanMessage("do it")]}, config("t"))
    errors = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in errors] == ["bad-1", "bad-2"]
    assert "not valid JSON" in str(errors[0].content)
    assert "launch_rockets" in str(errors[1].content) and errors[1].status == "error"
    assert result["messages"][-1].content == "Sorry."
