"""Serving: a continuous-batching engine behind an OpenAI-compatible HTTP API and a web chat."""
