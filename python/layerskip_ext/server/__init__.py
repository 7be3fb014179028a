"""An OpenAI-compatible server for LayerSkip models, batching concurrent requests continuously.

    layerskip-ext serve --model checkpoints/layerskip-demo --port 8000 --max-batch 8
    curl localhost:8000/v1/completions -d '{"model": "layerskip-demo", "prompt": "It was", "max_tokens": 16}'

app.py holds the routes, protocol.py the request schemas and error bodies, scheduler.py the thread that steps
the engine over every active row. Needs the `serve` extra: pip install 'layerskip_ext[serve]'.
"""
from __future__ import annotations


def serve(model, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_kwargs) -> None:
    """Runs the server in this process until interrupted (app_kwargs: see app.create_app)."""
    import sys

    import uvicorn

    from .app import create_app
    # an engine step runs without the GIL (torch releases it around custom-class calls: the HTTP thread ran all
    # through a 1.6 s generation, its longest pause 3.3 ms), but the scheduler thread's Python between steps
    # (turning tokens into text, queueing events) holds it: hand it to the HTTP thread within 0.5 ms (not the
    # default 5 ms) so that streaming a token does not wait for the next forced switch
    sys.setswitchinterval(0.0005)
    uvicorn.run(create_app(model, **app_kwargs), host=host, port=port, log_level=log_level)
