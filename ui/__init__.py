"""The Agent Chat UI, built from a pinned npm package and served locally (`make chat-ui`)."""
