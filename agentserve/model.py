"""The chat model client: ChatOpenAI against OpenAI, any compatible server, or the offline model."""

from __future__ import annotations

from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from agentserve import model_requests
from agentserve.settings import Settings

OFFLINE_MODEL_NAME = "offline-model"


def build_chat_model(settings: Settings, offline_base_url: str | None = None) -> ChatOpenAI:
    """The same client class either way, so the offline model exercises the
    production code path (request shaping, streaming, tool-call parsing)."""
    api_key, base_url, model = settings.OPENAI_API_KEY, settings.OPENAI_BASE_URL or None, settings.OPENAI_MODEL
    if offline_base_url is not None:
        api_key, base_url, model = SecretStr("offline"), offline_base_url, OFFLINE_MODEL_NAME
    model_requests.install()
    return ChatOpenAI(
        model=model,
        api_key=api_key,
        base_url=base_url,
        timeout=settings.OPENAI_TIMEOUT_S,
        max_retries=settings.OPENAI_MAX_RETRIES,
        stream_usage=True,
    )
