"""The browser pages: sign-in, which trades an API key for a session cookie."""
