"""`eaglespec serve`: an OpenAI-compatible HTTP server, Prometheus metrics and a chat page.

Needs the `serve` extra (fastapi, uvicorn, prometheus_client). `create_app(engine, ServeConfig)`
builds the app around any Generator; `eaglespec.serve.loadtest` drives a running server.
"""
