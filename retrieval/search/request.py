"""One search request, declared once: the CLI builds it from options, the HTTP API parses it from a query string, a
form or a JSON body, `clipdex search` sends it to a running server, and the OpenAPI schema is generated from it.

Each field says how it travels (`Wire`): a `PARAM` goes in a query string, a JSON body or a form field; a `FILE` only
as a multipart upload (or, on the command line, a path); a `LOCAL` one never leaves the process (`--where` is SQL,
which the server does not take). Standard library only: building a request costs `clipdex search` nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipdex.retrieval.config import Kind
from clipdex.retrieval.errors import InputError

if TYPE_CHECKING:
    from clipdex.retrieval.search.filters import Filter
    from clipdex.retrieval.search.query import Query


class Wire(str, Enum):
    PARAM = "param"
    FILE = "file"
    LOCAL = "local"


def _param(
    default: Any, help: str, *, wire: Wire = Wire.PARAM, name: str | None = None, choices: tuple[str, ...] = (),
    **kw: Any,
) -> Any:  # fmt: skip
    meta = {"help": help, "wire": wire, "name": name, "choices": choices}
    if callable(default):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


MAX_IMAGE_TERMS = 4  # add_image and subtract_image files in one search, each
DEFAULT_RERANK_K = 16  # candidates the re-ranking head re-scores when no number is given (benchmarks/RESULTS.md)
MAX_RERANK_K = 256  # the most a server re-scores for one query
SORTS = ("score", "date", "-date", "name")  # how a search may order what it found
OFFLINE = ("hide", "show")  # what a search does with items on a drive or folder that cannot be read now
MODES = ("semantic", "lexical", "hybrid")  # by meaning (CLIP), by words (full text), or both fused

Image = Path | bytes  # a file on this machine, or an upload's bytes


@dataclass(frozen=True)
class SearchRequest:
    """What a search asks for. Texts take an rclip-style weight prefix (`2:text`); a subtraction negates it."""

    q: str | None = _param(None, "Text query (`2:text` weighs it 2).")
    like: int | None = _param(None, "An indexed item's id, to search by its vector.")
    add: tuple[str, ...] = _param(tuple, "Texts added to the query (repeatable).")
    subtract: tuple[str, ...] = _param(tuple, "Texts subtracted from the query (repeatable).")
    k: int = _param(10, "Number of results.")
    target: Kind = _param(Kind.IMAGE, "Search images or texts.")  # noqa: RUF009  # an immutable enum member
    include_self: bool = _param(
        False,
        "Keep the indexed items the query is made of (a `like` item, an uploaded image's indexed copies); "
        "by default they are left out.",
    )
    dedup: float | None = _param(None, "Leave out results this close (cosine) to a better one.")
    in_folder: str | None = _param(None, "Only items at or under this folder.", name="in")
    after: str | None = _param(None, "Only photos taken (else modified) on or after this date.")
    before: str | None = _param(None, "Only photos taken (else modified) before this date.")
    min_score: float | None = _param(None, "Only results scoring at least this cosine.")
    sort: str = _param(
        "score", "Order the results found by score, date (-date: newest first) or name.",
        choices=SORTS,
    )  # fmt: skip
    offline: str = _param(
        "hide", "Items on a drive or folder that could not be read at the last index run: hide, or show (flagged).",
        choices=OFFLINE,
    )  # fmt: skip
    rerank: int | None = _param(
        None, "Re-score the top K results with the index's re-ranking head (`clipdex finetune --method rerank`)."
    )
    mode: str | None = _param(
        None,
        "Rank by meaning (semantic: CLIP), by the words of captions and of text read in images (lexical), or both "
        "fused (hybrid). Default: hybrid for a text query on an index with OCR text, else semantic.",
        choices=MODES,
    )
    relevant: bool = _param(
        False,
        "Return every result judged relevant (a cut-off calibrated on this query's scores over the library; at "
        "most 1000) instead of k.",
    )
    image: Image | None = _param(None, "Query with an image (image→image by default).", wire=Wire.FILE)  # noqa: RUF009
    add_image: tuple[Image, ...] = _param(tuple, "Images added to the query (repeatable).", wire=Wire.FILE)
    subtract_image: tuple[Image, ...] = _param(tuple, "Images subtracted from the query (repeatable).", wire=Wire.FILE)
    where: str | None = _param(None, "A DuckDB condition on the items' columns.", wire=Wire.LOCAL)

    # -- building the library's query and filter -----------------------------------------------------------------

    def query(self) -> Query:
        from clipdex.retrieval.search.query import Query

        paths, uploads = _split(self.image)
        add_paths, add_data = _split_all(self.add_image)
        sub_paths, sub_data = _split_all(self.subtract_image)
        return Query.build(
            text=self.q,
            image=paths,
            data=uploads,
            like=self.like,
            add=self.add,
            subtract=self.subtract,
            add_image=add_paths,
            subtract_image=sub_paths,
            add_data=add_data,
            subtract_data=sub_data,
        )

    def filter(self, *, option_prefix: str = "--") -> Filter | None:
        from clipdex.retrieval.search.filters import Filter

        return Filter.build(
            where=self.where,
            in_folder=Path(self.in_folder) if self.in_folder else None,
            after=self.after,
            before=self.before,
            min_score=self.min_score,
            option_prefix=option_prefix,
        )

    def check_limits(self, *, max_k: int, max_chars: int) -> None:
        """A server's limits on k and on the length of each text."""
        for text in [self.q or "", *self.add, *self.subtract]:
            if len(text) > max_chars:
                raise InputError(f"a query text is {len(text)} characters long; the limit is {max_chars}")
        if not 1 <= self.k <= max_k:
            raise InputError(f"k must be between 1 and {max_k} (got {self.k})")
        if self.rerank is not None and not 1 <= self.rerank <= MAX_RERANK_K:
            raise InputError(f"rerank must be between 1 and {MAX_RERANK_K} (got {self.rerank})")
        for name in ("add_image", "subtract_image"):
            if len(getattr(self, name)) > MAX_IMAGE_TERMS:
                raise InputError(f"at most {MAX_IMAGE_TERMS} `{name}` files")

    # -- on the wire ----------------------------------------------------------------------------------------------

    def wire_fields(self) -> list[tuple[str, str]]:
        """The `PARAM` fields that differ from their defaults, as (name, text) pairs: a query string or form fields."""
        out = []
        for f in params(Wire.PARAM):
            value = getattr(self, f.name)
            if value is None or value == _default(f):
                continue
            for v in value if isinstance(value, tuple) else (value,):
                out.append((wire_name(f), _to_text(v)))
        return out

    def files(self) -> list[tuple[str, bytes]]:
        """The `FILE` fields as (name, bytes) pairs; image paths are read (once each)."""
        if self.image is None and not self.add_image and not self.subtract_image:
            return []  # a text search sent to a server imports no imaging code (Pillow)
        from clipdex.retrieval.imaging.decode import read_query_image
        from clipdex.retrieval.paths import canonical

        out = []
        for f in params(Wire.FILE):
            value = getattr(self, f.name)
            for v in value if isinstance(value, tuple) else (value,) if value is not None else ():
                out.append((f.name, v if isinstance(v, bytes) else read_query_image(canonical(v))))
        return out

    @classmethod
    def from_fields(
        cls, get: Callable[[str], list[str]], files: Mapping[str, list[bytes]] | None = None
    ) -> SearchRequest:
        """From text fields (a query string or a form: `get(name)` gives every value sent under that name) and, for a
        form, uploaded files by field name."""
        values: dict[str, Any] = {}
        for f in params(Wire.PARAM):
            sent = [v for v in get(wire_name(f)) if v != ""]
            if sent:
                values[f.name] = _from_text(f, sent)
        for name, data in (files or {}).items():
            values[name] = tuple(data) if name != "image" else data[0]
        return cls(**values)

    @classmethod
    def from_json(cls, body: Any) -> SearchRequest:
        """From a JSON object with the `PARAM` fields (texts, numbers, booleans and lists as JSON has them)."""
        if not isinstance(body, dict):
            raise InputError("the JSON body must be an object: {'q': TEXT, 'k': N, 'target': 'images'|'texts', ...}")
        known = {wire_name(f): f for f in params(Wire.PARAM)}  # other fields are ignored, as query strings' are
        values = {}
        for name, f in known.items():
            value = body.get(name, body.get(f.name))
            if value is not None:
                values[f.name] = _from_json(f, value)
        return cls(**values)


def params(wire: Wire | None = None) -> list[Any]:
    """The request's fields, in declaration order, those of one wire kind when given."""
    return [f for f in fields(SearchRequest) if wire is None or f.metadata["wire"] is wire]


def wire_name(f: Any) -> str:
    return f.metadata["name"] or f.name


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _kind_of(f: Any) -> str:
    """The field's JSON type: string, integer, number, boolean, target, or array (of strings)."""
    return {
        "str | None": "string",
        "int | None": "integer",
        "int": "integer",
        "float | None": "number",
        "bool": "boolean",
        "Kind": "target",
        "tuple[str, ...]": "array",
        "str": "string",
    }[str(f.type)]


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Kind):
        return value.plural
    return str(value)


_INT = re.compile(r"-?[0-9]{1,18}")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _from_text(f: Any, sent: list[str]) -> Any:
    kind, name, text = _kind_of(f), wire_name(f), sent[-1].strip()
    if kind == "array":
        return tuple(sent)
    if kind == "string":
        return _choice(f, sent[-1])
    if kind == "integer":
        if not _INT.fullmatch(text):
            raise InputError(f"{name} must be a whole number (got {sent[-1]!r})")
        return int(text)
    if kind == "number":
        try:
            number = float(text)
        except ValueError:
            raise InputError(f"{name} must be a number (got {sent[-1]!r})") from None
        if not math.isfinite(number):
            raise InputError(f"{name} must be a finite number (got {sent[-1]!r})")
        return number
    if kind == "boolean":
        if text.lower() not in _TRUE + _FALSE:
            raise InputError(f"{name} must be true or false (got {sent[-1]!r})")
        return text.lower() in _TRUE
    return _target(sent[-1])


def _from_json(f: Any, value: Any) -> Any:
    kind, name = _kind_of(f), wire_name(f)
    if isinstance(value, str) and kind in ("integer", "number", "boolean"):
        return _from_text(f, [value])  # "10" for 10, "true" for true: as lenient as a query string
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        "boolean": isinstance(value, bool),
        "target": isinstance(value, str),
        "array": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        want = {"array": "a list of texts", "target": "images or texts"}.get(kind, f"a JSON {kind}")
        raise InputError(f"{name} must be {want} (got {value!r})")
    if kind == "array":
        return tuple(value)
    if kind == "number":
        return float(value)
    if kind == "string":
        return _choice(f, value)
    return _target(value) if kind == "target" else value


def _choice(f: Any, value: str) -> str:
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise InputError(f"{wire_name(f)} must be one of {', '.join(choices)} (got {value!r})")
    return value


def _target(text: str) -> Kind:
    if text not in ("images", "texts"):
        raise InputError(f"target must be images or texts (got {text!r})")
    return Kind(text)


def _split(image: Image | None) -> tuple[Path | None, bytes | None]:
    if image is None:
        return None, None
    return (None, image) if isinstance(image, bytes) else (Path(image), None)


def _split_all(images: Iterable[Image]) -> tuple[list[Path], list[bytes]]:
    paths = [Path(i) for i in images if not isinstance(i, bytes)]
    return paths, [i for i in images if isinstance(i, bytes)]


def openapi_parameters() -> list[dict[str, Any]]:
    """The GET operation's query parameters."""
    return [
        {
            "name": wire_name(f),
            "in": "query",
            "required": False,
            "description": f.metadata["help"],
            "schema": _schema(f),
        }
        for f in params(Wire.PARAM)
    ]


def openapi_body() -> dict[str, Any]:
    """The POST operation's request body: the same fields as JSON, or as a form with image files."""
    props = {wire_name(f): {**_schema(f), "description": f.metadata["help"]} for f in params(Wire.PARAM)}
    binary = {"type": "string", "format": "binary"}
    files = {
        f.name: {"type": "array", "items": binary, "maxItems": MAX_IMAGE_TERMS} if f.name != "image" else binary
        for f in params(Wire.FILE)
    }
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "properties": props}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {**files, **props}}},
        },
    }


def _schema(f: Any) -> dict[str, Any]:
    kind = _kind_of(f)
    if kind == "array":
        return {"type": "array", "items": {"type": "string"}}
    if kind == "target":
        return {"type": "string", "enum": ["images", "texts"], "default": "images"}
    schema: dict[str, Any] = {"type": kind}
    if f.metadata["choices"]:
        schema["enum"] = list(f.metadata["choices"])
    if f.name == "rerank":
        schema.update(minimum=1, maximum=MAX_RERANK_K)
    if _default(f) is not None:
        schema["default"] = _default(f)
    return schema
