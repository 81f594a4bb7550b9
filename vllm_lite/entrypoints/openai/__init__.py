"""OpenAI-compatible HTTP server (FastAPI): see api_server.build_app / run_server."""
