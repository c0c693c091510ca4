"""Serving: an OpenAI-compatible HTTP server over a scheduler with continuous batching (`l4compile serve`).

An optional extra (`pip install 'l4compile[serve]'`: fastapi, uvicorn); the runtime never imports it.
scheduler.py owns the batch and steps the engine; app.py validates, enqueues and streams.
"""
