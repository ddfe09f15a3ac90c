"""OpenAI-compatible HTTP server (FastAPI): `dsinfer serve`."""
