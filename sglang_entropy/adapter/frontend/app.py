"""The HTTP app that SGLang's tokenizer workers import (``--tokenizer-worker-num`` > 1).

SGLang runs ``load_plugins()`` in its own processes but not in the uvicorn workers, which
import the app named by ``SGLANG_HTTP_SERVER_APP_PATH``; ``--enable-entropy`` points that
variable here (unless it is set), so the adapter's HTTP side runs in every worker.
"""

from sglang.srt.plugins import load_plugins

load_plugins()

from sglang.srt.entrypoints.http_server import app  # noqa: E402  (after the plugins' hooks)

__all__ = ["app"]
