"""Optional semantic response cache: a new prompt gets a cached answer when its embedding (the model's own
mean-pooled final hidden states) is closer than a threshold to a cached prompt's, and every other request
field is the same. Nearest neighbours come from an hnswlib index (cosine), bounded: the oldest entry is
overwritten when it is full."""
import numpy as np


class SemanticCache:
    def __init__(self, dim: int, threshold: float, capacity: int = 1024, neighbours: int = 4):
        import hnswlib
        self.index = hnswlib.Index(space="cosine", dim=dim)
        self.index.init_index(max_elements=capacity, ef_construction=100, M=16)
        self.threshold, self.capacity, self.neighbours = threshold, capacity, neighbours
        self.entries: dict[int, tuple[str, dict]] = {}  # label -> (key of the other fields, answer)
        self.next_label, self.hits, self.misses = 0, 0, 0

    def get(self, vector, fields_key: str) -> dict | None:
        if self.entries:
            k = min(self.neighbours, len(self.entries))
            labels, distances = self.index.knn_query(np.asarray(vector, dtype=np.float32), k=k)
            for label, distance in zip(labels[0], distances[0]):
                key, answer = self.entries[int(label)]
                if key == fields_key and 1 - distance >= self.threshold:
                    self.hits += 1
                    return answer
        self.misses += 1
        return None

    def put(self, vector, fields_key: str, answer: dict):
        label = self.next_label % self.capacity
        self.index.add_items(np.asarray(vector, dtype=np.float32)[None, :], [label])
        self.entries[label] = (fields_key, answer)
        self.next_label += 1
