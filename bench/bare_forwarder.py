"""The bare stack: Flask + one pooled requests.Session forwarding chat completions upstream.

    OPENAI_BASE_URL=http://127.0.0.1:9000/v1 gunicorn -c gunicorn.conf.py bench.bare_forwarder:app
"""
import os

import requests
from flask import Flask, Response, request

UPSTREAM = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:9000/v1").rstrip("/") + "/chat/completions"
HEADERS = {"Authorization": "Bearer " + os.environ.get("OPENAI_API_KEY", "sk-bench")}
SESSION = requests.Session()
SESSION.mount("http://", requests.adapters.HTTPAdapter(pool_connections=32, pool_maxsize=256))
app = Flask(__name__)


@app.post("/v1/chat/completions")
def chat_completions():
    """Forward the body; relay the answer, streaming it through when asked to."""
    body = request.get_json()
    stream = bool(body.get("stream"))
    upstream = SESSION.post(UPSTREAM, json=body, headers=HEADERS, stream=stream, timeout=(10, 300))
    if not stream:
        return Response(upstream.content, upstream.status_code, content_type="application/json")

    def relay():
        """Pass the upstream's bytes on as they arrive; always release the connection."""
        try:
            yield from upstream.iter_content(chunk_size=None)
        finally:
            upstream.close()

    return Response(relay(), upstream.status_code, content_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
