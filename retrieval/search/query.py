"""Query arithmetic: a search is a weighted sum of texts, images and indexed items, normalised.

`"a dog" --add "in the snow" --subtract "indoors"`: each term is embedded and L2-normalised, weighted (+1 for the
query and each added term, −1 for each subtracted one; an rclip-style `2:text` prefix sets the weight, which a
subtraction negates), summed, and normalised again; results rank by cosine with that vector. A plain query is one
term, searched with its embedding as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdex.retrieval.errors import InputError

_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*:(.*\S.*)$", re.DOTALL)


@dataclass(frozen=True)
class Term:
    """One part of a query: exactly one of `text`, `image` (a file), `data` (image bytes) or `item` (an id)."""

    weight: float
    text: str | None = None
    image: Path | None = None
    data: bytes | None = None
    item: int | None = None

    def to_json(self) -> dict[str, Any]:
        if self.text is not None:
            return {"weight": self.weight, "text": self.text}
        if self.item is not None:
            return {"weight": self.weight, "like": self.item}
        return {"weight": self.weight, "image": str(self.image) if self.image is not None else "upload"}


def weighted(text: str, sign: float = 1.0) -> tuple[float, str]:
    """`2:in the snow` → (2.0, "in the snow"); a text without a prefix weighs 1. `sign` is −1 for subtractions."""
    match = _WEIGHT.match(text)
    if match is None:
        return sign, text
    return sign * float(match.group(1)), match.group(2).strip()


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...]

    @classmethod
    def build(
        cls,
        *,
        text: str | None = None,
        image: Path | None = None,
        data: bytes | None = None,
        like: int | None = None,
        add: Iterable[str] = (),
        subtract: Iterable[str] = (),
        add_image: Iterable[Path] = (),
        subtract_image: Iterable[Path] = (),
        add_data: Iterable[bytes] = (),
        subtract_data: Iterable[bytes] = (),
    ) -> Query:
        terms: list[Term] = []
        if text is not None:
            w, t = weighted(text)
            terms.append(Term(w, text=t))
        if image is not None:
            terms.append(Term(1.0, image=image))
        if data is not None:
            terms.append(Term(1.0, data=data))
        if like is not None:
            terms.append(Term(1.0, item=like))
        for sign, texts in ((1.0, add), (-1.0, subtract)):
            for t in texts:
                w, body = weighted(t, sign)
                terms.append(Term(w, text=body))
        terms += [Term(1.0, image=p) for p in add_image] + [Term(-1.0, image=p) for p in subtract_image]
        terms += [Term(1.0, data=d) for d in add_data] + [Term(-1.0, data=d) for d in subtract_data]
        for term in terms:
            if term.text is not None and not term.text.strip():
                raise InputError("a query text is empty")
        if not terms:
            raise InputError("give a text query, --image FILE or --like ID")
        if all(t.weight <= 0 for t in terms):
            raise InputError("the query needs a positive term: a text, --image, --like or --add")
        return cls(tuple(terms))

    @property
    def is_plain(self) -> bool:
        """One term of weight 1 and nothing to compose: searched with its embedding exactly as it is."""
        return len(self.terms) == 1 and self.terms[0].weight == 1.0

    def towers(self) -> frozenset[str]:
        """The model's towers embedding this query takes ("text", "image"); an indexed item needs neither."""
        needs = {"text" if t.text is not None else "image" for t in self.terms if t.item is None}
        return frozenset(needs)

    def label(self) -> str:
        """What search results name as their query: the first positive term."""
        first = next(t for t in self.terms if t.weight > 0)
        if first.text is not None:
            return first.text
        if first.item is not None:
            return f"like:{first.item}"
        return str(first.image) if first.image is not None else "upload"

    def describe(self) -> list[dict[str, Any]] | None:
        """The terms, for results of a composed query (None for a plain text or image query)."""
        if self.is_plain and self.terms[0].item is None:
            return None
        return [t.to_json() for t in self.terms]
