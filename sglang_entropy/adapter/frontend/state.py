"""The one owner of the adapter's state in the HTTP server process (``FRONTEND``)."""

from __future__ import annotations

import functools

from sglang_entropy.adapter.frontend.groups import GroupBook
from sglang_entropy.adapter.metrics import ProcessState


class FrontendState(ProcessState):
    """Everything the adapter holds in one HTTP server process: the server's settings, its
    metrics, the groups of traces and budget groups, and the OpenAI streams in flight."""

    def __init__(self):
        # id of an OpenAI request object -> choice index -> entropy values not yet sent in a chunk
        self.openai_streams: dict[int, dict[int, dict]] = {}

    @functools.cached_property
    def groups(self) -> GroupBook:
        return GroupBook(self.settings.config.limits, self.metrics)


FRONTEND = FrontendState()
