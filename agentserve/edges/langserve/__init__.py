"""LangServe's routes (`add_routes` at /agent): invoke, batch, stream, stream_events."""
