"""The OpenAI-compatible HTTP server: protocol models, the chat and completion handlers, metrics, the app."""
