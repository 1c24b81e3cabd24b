"""The sign-in page: trade an API key for an HttpOnly, SameSite=Strict session
cookie once, so a person can use the playground in a browser with auth left on."""

from __future__ import annotations

import html
import secrets
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from agentserve.auth import principal_for
from agentserve.sessions import COOKIE, SESSION_TTL_S, Session, SessionSigner, safe_next


def signin_page(next_path: str, error: str = "") -> str:
    message = f'<p class="error">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:26rem;margin:5rem auto}}
input{{width:100%;padding:.5rem;margin:.5rem 0}}.error{{color:#b00020}}
.note{{color:#555;font-size:.9rem}}</style></head>
<body><h1>Sign in to the agent</h1>{message}
<form method="post" action="/signin">
<label for="api_key">API key</label>
<input id="api_key" name="api_key" type="password" autocomplete="off" required autofocus>
<input type="hidden" name="next" value="{html.escape(next_path)}">
<button type="submit">Sign in</button></form>
<p class="note">The playground is LangServe's chat page: it keeps your conversation on the
server (answers after a reload still know it), but it cannot load it back onto the page
or show approvals. For the whole conversation after a reload, streaming and refund
approvals, use the Agent Chat UI (see the README: <code>make chat-ui</code>).</p></body></html>"""


router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/signin")
async def signin_form(next: str | None = None) -> HTMLResponse:
    return HTMLResponse(signin_page(safe_next(next)))


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = parse_qs((await request.body()).decode(errors="replace"))
    key = (form.get("api_key") or [""])[0]
    next_path = safe_next((form.get("next") or [""])[0])
    principal = principal_for(request, key) if key else None
    if principal is None:
        return HTMLResponse(signin_page(next_path, "That key is not valid."), status_code=401)
    signer: SessionSigner = request.app.state.sessions
    response = RedirectResponse(next_path, status_code=303)
    session = Session(tenant=principal.tenant, thread_id=f"playground-{secrets.token_hex(8)}")
    response.set_cookie(
        COOKIE,
        signer.issue(session),
        max_age=SESSION_TTL_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.api_route("/signout", methods=["GET", "POST"])
async def signout() -> Response:
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
