"""The ReAct agent: a chat model that calls tools in a loop, built by hand with StateGraph.

Reads top to bottom: prompt, tools, state, the model node, the router, `build_graph()`.
The graph knows nothing of HTTP or of who is calling; `agentserve.runs` adapts it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal

import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.managed import RemainingSteps
from langgraph.prebuilt import ToolNode
from langgraph.types import interrupt
from pydantic import Field
from typing_extensions import TypedDict

from agentserve.breaker import CircuitBreaker
from agentserve.calculator import CalculatorError, evaluate, format_number
from agentserve.core.refunds import RefundLedger
from agentserve.decisions import BadDecision, approval_request, parse_decision
from agentserve.metrics import BREAKER_OPEN, MODEL_CALL_DURATION, MODEL_CALL_ERRORS
from agentserve.tracing import tracer

SYSTEM_PROMPT = (
    "You are a helpful customer-support assistant. Use the calculator for any "
    "arithmetic and the clock for the date or time; never guess either. "
    "Answer briefly. The current time is {now}."
)
STEP_BUDGET_ANSWER = (
    "I'm sorry, I could not finish this within the number of steps I'm allowed. "
    "Please ask again, perhaps in smaller parts."
)
# Failures of the provider itself, as opposed to a request it refused.
PROVIDER_FAILURES = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
INTERRUPTED_TOOL_RESULT = "Error: this tool call was interrupted before it finished and did not run."


# Coroutines, though their work is quick and synchronous: a sync tool runs in a
# thread, and each of its callback events there starts an event loop of its own.
@tool
async def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 * 8' or '(3 + 4) ** 2'."""
    try:
        return format_number(evaluate(expression))
    except CalculatorError as exc:
        return f"Error: {exc}"


@tool
async def current_datetime() -> str:
    """Return the current date and time in UTC, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


TOOLS: list[BaseTool] = [calculator, current_datetime]
Amount = Annotated[float, Field(gt=0, le=10_000, description="Amount to refund, in the order's currency")]


def refund_tool(ledger: RefundLedger) -> BaseTool:
    """`issue_refund`, which pays out only after a person approves it: the run
    pauses at `interrupt` and resumes with the reviewer's decision (accept, edit
    the amount, or reject; see agentserve.decisions)."""

    @tool
    async def issue_refund(order_id: str, amount: Amount, config: RunnableConfig) -> str:
        """Refund `amount` to the customer for `order_id`. A person must approve it first."""
        answer = interrupt(approval_request(order_id, amount))
        try:
            decision = parse_decision(answer)
        except BadDecision as exc:
            return f"Refund rejected: the reviewer's answer was not understood ({exc}). It was not issued."
        if not decision.approved:
            reason = f": {decision.reason}" if decision.reason else ""
            return f"Refund rejected by the reviewer{reason}. It was not issued."
        order_id = decision.order_id or order_id
        amount = decision.amount or amount
        configurable = config.get("configurable") or {}
        refund = await ledger.record(
            str(configurable["tenant"]),
            order_id,
            Decimal(str(amount)).quantize(Decimal("0.01")),
            str(configurable["thread_id"]),
        )
        if refund.new:
            return f"Refund {refund.refund_id} of {refund.amount} issued for order {order_id}."
        return f"Order {order_id} was already refunded ({refund.amount}, {refund.refund_id}); nothing more was paid."

    return issue_refund


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    remaining_steps: RemainingSteps


def context_window(messages: Sequence[AnyMessage], limit: int) -> list[AnyMessage]:
    """The recent messages the model sees: at most `limit`, never opening on a tool
    result without its call, and with an answer for every tool call (a run killed
    between a call and its result would otherwise be refused by the provider)."""
    start = max(0, len(messages) - limit)
    while start < len(messages) and isinstance(messages[start], ToolMessage):
        start += 1
    repaired: list[AnyMessage] = []
    unanswered: list[str] = []
    for message in messages[start:]:
        if unanswered and not isinstance(message, ToolMessage):
            repaired += [ToolMessage(INTERRUPTED_TOOL_RESULT, tool_call_id=i) for i in unanswered]
            unanswered = []
        repaired.append(message)
        if isinstance(message, AIMessage) and message.tool_calls:
            unanswered = [str(call["id"]) for call in message.tool_calls]
        elif isinstance(message, ToolMessage) and message.tool_call_id in unanswered:
            unanswered.remove(message.tool_call_id)
    repaired += [ToolMessage(INTERRUPTED_TOOL_RESULT, tool_call_id=i) for i in unanswered]
    return repaired


def answer_malformed_tool_calls(state: AgentState) -> dict[str, list[ToolMessage]]:
    """The model asked for tools with arguments that are not valid JSON: tell it so,
    as tool results, and let it try again. Valid calls in the same message are not
    run, so that the model sees one consistent outcome."""
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    results = [
        ToolMessage(
            f"Error: the arguments of {call.get('name')!r} were not valid JSON ({call.get('error')}); "
            "call the tool again with a JSON object.",
            tool_call_id=str(call.get("id")),
            status="error",
        )
        for call in last.invalid_tool_calls
    ]
    results += [
        ToolMessage(
            "Error: not run, because another call in the same message was malformed; call it again.",
            tool_call_id=str(call["id"]),
            status="error",
        )
        for call in last.tool_calls
    ]
    return {"messages": results}


def build_graph(
    model: BaseChatModel,
    checkpointer: BaseCheckpointSaver | None = None,
    *,
    tools: Sequence[BaseTool] = TOOLS,
    context_messages: int = 24,
    breaker: CircuitBreaker | None = None,
) -> CompiledStateGraph:
    bound_model = model.bind_tools(list(tools))
    breaker = breaker or CircuitBreaker()

    async def call_model(state: AgentState, config: RunnableConfig) -> dict[str, list[AIMessage]]:
        prompt = SystemMessage(SYSTEM_PROMPT.format(now=datetime.now(UTC).isoformat(timespec="minutes")))
        window = context_window(state["messages"], context_messages)
        breaker.before_call()
        started = time.perf_counter()
        try:
            with tracer.start_as_current_span("model call", attributes={"agent.context_messages": len(window)}):
                response = await bound_model.ainvoke([prompt, *window], config)
        except PROVIDER_FAILURES as exc:  # what is left after the client's own retries
            breaker.record_failure()
            MODEL_CALL_ERRORS.labels(kind=type(exc).__name__).inc()
            raise
        finally:
            BREAKER_OPEN.set(breaker.state == "open")
        breaker.record_success()
        MODEL_CALL_DURATION.observe(time.perf_counter() - started)
        assert isinstance(response, AIMessage)
        # The step after a tool call needs one more step for the tool and one for the
        # model: without them, end politely rather than let LangGraph raise.
        if response.tool_calls and state["remaining_steps"] < 3:
            return {"messages": [AIMessage(STEP_BUDGET_ANSWER, id=response.id)]}
        return {"messages": [response]}

    def route_model_output(state: AgentState) -> Literal["tools", "answer_malformed_tool_calls", "__end__"]:
        last = state["messages"][-1]
        if isinstance(last, AIMessage) and last.invalid_tool_calls:
            return "answer_malformed_tool_calls"
        if isinstance(last, AIMessage) and last.tool_calls:
            return "tools"
        return "__end__"

    builder = StateGraph(AgentState)
    builder.add_node("call_model", call_model)
    builder.add_node("tools", ToolNode(list(tools)))
    builder.add_node("answer_malformed_tool_calls", answer_malformed_tool_calls)
    builder.add_edge(START, "call_model")
    builder.add_conditional_edges("call_model", route_model_output)
    builder.add_edge("tools", "call_model")
    builder.add_edge("answer_malformed_tool_calls", "call_model")
    return builder.compile(checkpointer=checkpointer, name="agent")
