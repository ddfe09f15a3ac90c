"""Exact-match response cache for deterministic requests (temperature 0 or a fixed seed), bounded LRU."""
import json
from collections import OrderedDict

from pydantic import BaseModel


class ResponseCache:
    def __init__(self, capacity: int):
        self.capacity, self.entries, self.hits, self.misses = capacity, OrderedDict(), 0, 0

    @staticmethod
    def key(endpoint: str, body: BaseModel) -> str:
        fields = body.model_dump(exclude={"stream", "stream_options", "user"}, exclude_none=True)
        return endpoint + json.dumps(fields, sort_keys=True, separators=(",", ":"))

    def get(self, key: str) -> dict | None:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        return None

    def put(self, key: str, value: dict):
        if self.capacity <= 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
