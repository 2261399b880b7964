"""The HTTP API's response shapes, for its OpenAPI schema. Requests are `search.request.SearchRequest`'s."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel


class HitModel(BaseModel):
    rank: int
    score: float
    id: int
    kind: Literal["image", "text"]
    path: str | None
    text: str | None


class TermModel(BaseModel):
    weight: float
    text: str | None = None
    image: str | None = None
    like: int | None = None


class SearchResponse(BaseModel):
    query: str
    target: Literal["images", "texts"]
    terms: list[TermModel] | None = None
    results: list[HitModel]


class ItemModel(BaseModel):
    id: int
    kind: Literal["image", "text"]
    path: str | None
    text: str | None


class ErrorModel(BaseModel):
    error: str


class JSONAsPrinted(Response):
    """JSON as the CLI prints it (json.dumps, no ASCII escaping), so both give the same bytes."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False).encode("utf-8")


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
