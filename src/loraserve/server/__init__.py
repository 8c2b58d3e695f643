"""The OpenAI-compatible HTTP server.

    launch.py        ``loraserve serve``: engine + adapters + app under uvicorn
    app.py           the FastAPI app: one function per route
    async_engine.py  the engine on its own thread, driven from the event loop
    protocol.py      request/response models (OpenAI's shapes, vLLM's extras)
    render.py        engine outputs -> responses, stream chunks, server-sent events
    errors.py        OpenAI-shaped errors and the status of each failure
    metrics.py       Prometheus metrics (vLLM's names where gateways read them)
    resolver.py      adapter names -> directories inside --adapter-dir, safely

Importing this package is cheap: FastAPI is imported by app.py only.
"""
