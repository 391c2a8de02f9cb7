"""Responses of several sequences: the traces of a group and the sequences of a branching request.

Each sequence runs as its own request in the scheduler. ``SequenceOutputs`` folds one
sequence's outputs into ``meta_info["entropy"]`` as they arrive; ``MergedSequences`` runs the
sequences of one request at once and hands their outputs on in the order they arrive, each
marked with the sequence's ``index`` (as SGLang marks the outputs of a streamed ``n`` > 1
request), so a streamed response interleaves them and an unstreamed one collects the last
output of each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sglang_entropy.adapter.protocol import entropy_field


def stream_mode(obj, tokenizer_manager) -> str | None:
    """How a request's outputs arrive (see ``SequenceOutputs``)."""
    if not obj.stream:
        return None
    return "incremental" if tokenizer_manager.incremental_streaming_output else "cumulative"


class SequenceOutputs:
    """One sequence's outputs: the entropy values new in each, and the sequence's text and
    values so far.

    ``stream`` is None for an unstreamed request (one output), "cumulative" for SGLang's
    default streaming (each output repeats the text and values of the tokens before it, so
    only those past ``offset`` are new) and "incremental" (``--incremental-streaming-output``:
    each output holds only the new text and values)."""

    def __init__(self, policy: str, stream: str | None):
        self.policy = policy
        self.stream = stream
        self.offset = 0
        self.text = ""
        self.signals: dict[str, list] = {}
        self.events: list[dict] = []

    def shape(self, output: dict) -> dict:
        """Move ``output``'s per-token keys into ``meta_info["entropy"]``, holding the values of
        the tokens new in this output, and return that dict."""
        meta = output["meta_info"]
        shaped = entropy_field(meta, self.policy, self.offset)
        new = shaped[0] if shaped else {"policy": self.policy, "signals": {}, "events": []}
        if shaped is not None and self.stream == "cumulative":
            self.offset = shaped[1]
        text = output.get("text") or ""
        self.text = self.text + text if self.stream == "incremental" else text
        for name, values in new["signals"].items():
            self.signals.setdefault(name, []).extend(values)
        self.events.extend(new["events"])
        meta["entropy"] = new
        return new


class MergedSequences:
    """The sequences of one request, running at once. ``start`` adds one (an async iterator of
    ``(output, final)``); iterating yields every sequence's items as they arrive, with
    ``output["index"]`` set, until all have ended. A sequence that raises fails the request;
    leaving the iteration cancels the sequences still running."""

    def __init__(self):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._running = 0

    def start(self, index: int, items: AsyncIterator[tuple[dict, bool]]) -> None:
        self._running += 1
        self._tasks.append(asyncio.create_task(self._pump(index, items)))

    async def _pump(self, index: int, items) -> None:
        try:
            async with contextlib.aclosing(items):
                async for output, final in items:
                    output["index"] = index
                    self._queue.put_nowait((output, final))
        except Exception as error:
            self._queue.put_nowait(error)
        finally:
            self._queue.put_nowait(None)  # this sequence has ended

    async def items(self) -> AsyncIterator[tuple[dict, bool]]:
        try:
            while self._running:
                item = await self._queue.get()
                if item is None:
                    self._running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
