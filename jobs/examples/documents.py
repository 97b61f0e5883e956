"""The document pipeline: normalise → chunk → embed (a local hashing vectoriser) → store → search."""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata

from django.contrib.postgres.search import SearchQuery, SearchRank
from django.db.models import F

from jobs.models import DocumentChunk

CHUNK_SIZE = 1000
CHUNK_OVERLAP = 200
EMBEDDING_DIMENSIONS = 256
_WORD = re.compile(r"\w+", re.UNICODE)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def chunk(text: str, size: int = CHUNK_SIZE, overlap: int = CHUNK_OVERLAP) -> list[str]:
    """Windows of `size` characters, each overlapping the previous one by `overlap`."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than the chunk size")
    if not text:
        return []
    step = size - overlap
    chunks = []
    for start in range(0, len(text), step):
        chunks.append(text[start : start + size])
        if start + size >= len(text):
            break
    return chunks


def embed(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic hashing vectoriser: signed token counts hashed into `dimensions`, L2-normalised."""
    vector = [0.0] * dimensions
    for token in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dimensions
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [round(v / norm, 6) for v in vector] if norm else vector


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def search(query: str, limit: int = 5) -> list[dict[str, object]]:
    """Full-text search over indexed chunks, best first."""
    search_query = SearchQuery(query, config="english")
    rows = (
        DocumentChunk.objects.filter(search_vector=search_query, document__status="indexed")
        .annotate(rank=SearchRank(F("search_vector"), search_query))
        .order_by("-rank", "document_id", "position")
        .values("document_id", "document__title", "position", "text", "rank")[:limit]
    )
    return [
        {
            "document_id": row["document_id"],
            "title": row["document__title"],
            "position": row["position"],
            "rank": float(row["rank"]),
            "snippet": row["text"][:200],
        }
        for row in rows
    ]
