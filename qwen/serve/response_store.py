"""The Responses API's stored responses: what ``previous_response_id`` continues and ``GET /v1/responses/{id}``
returns, kept in this process's memory (gone on restart, as vLLM keeps them).

Each entry holds the response object and the whole conversation up to and including it as Responses input items
(earlier turns' inputs and outputs, then its own); a follow-up's input is that list plus its new items, so a chain
survives the eviction of its older links. The lists share their item dicts, so a long chain costs one pointer per
item per link, not a copy of its text. The ``max_entries`` most recently stored or used are kept.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_STORED_RESPONSES = 1000  # the default bound (openai_api.py --max-stored-responses)


class ResponseStore:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, conversation: list[dict]) -> None:
        """Keep ``response`` and ``conversation`` (its input items and output items, oldest first)."""
        if self.max_entries <= 0:
            return
        self._entries[response["id"]] = (response, conversation)
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        """The stored response and its conversation, or None (never stored, evicted or deleted)."""
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None
