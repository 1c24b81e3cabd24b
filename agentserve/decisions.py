"""A reviewer's answer to a refund waiting for approval, in every form a client
sends it, and the approval request itself in the forms the UIs render.

Answers accepted:
- this server's own `{"approved": true|false, "reason": "..."}`;
- LangGraph's `HumanResponse` list, as the Agent Chat UI template's inbox sends it:
  `[{"type": "accept" | "edit" | "response" | "ignore", "args": ...}]`;
- LangChain's HITL answer, as the current Agent Chat UI sends it:
  `{"decisions": [{"type": "approve" | "edit" | "reject", "edited_action": {...}, "message": "..."}]}`.
An edit may change the amount (and the order), bounded like the tool's own arguments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_REFUND = 10_000.0
MAX_REASON_CHARS = 2000
MAX_ORDER_ID_CHARS = 64
ANSWER_HINT = (
    'answer with {"approved": true} or {"approved": false, "reason": "..."}, '
    'a list such as [{"type": "accept"}], or {"decisions": [{"type": "approve"}]}'
)


class BadDecision(ValueError):
    pass


@dataclass(frozen=True)
class Decision:
    approved: bool
    reason: str | None = None
    order_id: str | None = None  # set by an edit
    amount: float | None = None  # set by an edit


def approval_request(order_id: str, amount: float) -> dict[str, Any]:
    """The interrupt's payload: the plain action, LangGraph's HumanInterrupt and
    LangChain's HITL request side by side, so each client finds the shape it reads."""
    args = {"order_id": order_id, "amount": amount}
    description = f"Refund {amount:.2f} for order {order_id}? Accept to pay it, edit the amount, or reject it."
    return {
        "action": "issue_refund",
        "args": args,
        "action_request": {"action": "issue_refund", "args": args},
        "config": {"allow_accept": True, "allow_edit": True, "allow_respond": True, "allow_ignore": True},
        "description": description,
        "action_requests": [{"name": "issue_refund", "args": args, "description": description}],
        "review_configs": [{"action_name": "issue_refund", "allowed_decisions": ["approve", "edit", "reject"]}],
    }


def _reason(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadDecision("a rejection's reason must be text")
    if len(value) > MAX_REASON_CHARS:
        raise BadDecision(f"a rejection's reason may be at most {MAX_REASON_CHARS} characters")
    return value


def _edited(args: Any) -> Decision:
    """An edited action: `{"action": ..., "args": {...}}` or `{"name": ..., "args": {...}}`."""
    if not isinstance(args, dict):
        raise BadDecision("an edit must carry the edited action: {'args': {'order_id': ..., 'amount': ...}}")
    fields = args.get("args", args)
    if not isinstance(fields, dict):
        raise BadDecision("an edit's args must be an object with order_id and amount")
    amount: Any = fields.get("amount")
    try:
        value = float(amount)  # the inbox sends edited fields as text
    except (TypeError, ValueError) as exc:
        raise BadDecision("an edit's amount must be a number") from exc
    if not math.isfinite(value) or not 0 < value <= MAX_REFUND:
        raise BadDecision(f"an edit's amount must be more than 0 and at most {MAX_REFUND:g}")
    order_id = fields.get("order_id")
    if order_id is not None and (
        not isinstance(order_id, str) or not 0 < len(order_id) <= MAX_ORDER_ID_CHARS or not order_id.isprintable()
    ):
        raise BadDecision(f"an edit's order_id must be 1-{MAX_ORDER_ID_CHARS} printable characters")
    return Decision(approved=True, order_id=order_id, amount=round(value, 2))


def _human_response(item: Any) -> Decision:
    if not isinstance(item, dict):
        raise BadDecision(f"each answer must be an object; {ANSWER_HINT}")
    kind = item.get("type")
    if kind == "accept":
        return Decision(approved=True)
    if kind == "edit":
        return _edited(item.get("args"))
    if kind == "response":
        return Decision(approved=False, reason=_reason(item.get("args")))
    if kind == "ignore":
        return Decision(approved=False)
    raise BadDecision(f"answer type {kind!r} is not one of accept, edit, response, ignore")


def _hitl_decision(item: Any) -> Decision:
    if not isinstance(item, dict):
        raise BadDecision(f"each decision must be an object; {ANSWER_HINT}")
    kind = item.get("type")
    if kind == "approve":
        return Decision(approved=True)
    if kind == "edit":
        return _edited(item.get("edited_action"))
    if kind == "reject":
        return Decision(approved=False, reason=_reason(item.get("message")))
    raise BadDecision(f"decision type {kind!r} is not one of approve, edit, reject")


def parse_decision(value: Any) -> Decision:
    """The reviewer's answer, or BadDecision saying what is wrong with it."""
    if isinstance(value, list):
        if len(value) != 1:
            raise BadDecision("answer exactly one pending action")
        return _human_response(value[0])
    if isinstance(value, dict) and "decisions" in value:
        decisions = value["decisions"]
        if not isinstance(decisions, list) or len(decisions) != 1:
            raise BadDecision("decisions must be a list with one decision")
        return _hitl_decision(decisions[0])
    if isinstance(value, dict) and "type" in value:
        return _human_response(value)
    if isinstance(value, dict) and set(value) <= {"approved", "reason"} and isinstance(value.get("approved"), bool):
        return Decision(approved=value["approved"], reason=_reason(value.get("reason")))
    raise BadDecision(ANSWER_HINT)


def checked_decision(value: Any) -> Any:
    """For request validators: the value unchanged, or ValueError saying what is wrong."""
    if value is not None:
        try:
            parse_decision(value)
        except BadDecision as exc:
            raise ValueError(str(exc)) from exc
    return value


def pause_problem(resuming: bool, pending: list[dict[str, Any]] | None, how_to_resume: str) -> str | None:
    """A paused thread takes only a decision; a decision needs a paused thread.
    Why this turn does not fit the thread, or None when it does."""
    if resuming and not pending:
        return "has no pending action to resume; send messages instead"
    if not resuming and pending:
        actions = json.dumps([item.get("value") for item in pending])
        return f"is waiting for approval of {actions}; {how_to_resume}"
    return None
