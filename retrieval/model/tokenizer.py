"""CLIP's byte-level BPE tokenizer without torch: token ids equal to open_clip's `SimpleTokenizer`, as numpy.

The vocabulary is the one open_clip ships (`bpe_simple_vocab_16e6.txt.gz`), read from the installed package's folder
without importing it (importing open_clip imports torch). Cleaning is open_clip's default ("lower"): ftfy, HTML
unescaped twice, whitespace collapsed, lower case. Equality with open_clip is tested on a generated corpus
(tests/test_runtime.py).
"""

from __future__ import annotations

import functools
import html
import importlib.util
import itertools
import zlib
from pathlib import Path

import numpy as np
import regex

SOT, EOT = "<start_of_text>", "<end_of_text>"
_MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary uses, after the header line


def bundled_vocab() -> Path:
    """open_clip's BPE file, found without running open_clip's __init__."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("open_clip's bpe_simple_vocab_16e6.txt.gz (is open_clip installed?)")


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """Each byte as a printable character: printable Latin-1 bytes stand for themselves, the others are moved
    above 255 in order (GPT-2's byte-level trick: no byte is unknown, no token holds whitespace)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    # in this order: the vocabulary lists the symbols as this dict holds them
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def clean(text: str) -> str:
    if not _plain(text):
        import ftfy  # a tenth of a cold search's start (it loads wcwidth's tables): only for text that needs it

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.strip().split()).lower()


def _plain(text: str) -> bool:
    """Text that ftfy and HTML unescaping leave as it is: printable ASCII with no entity (mojibake, curly quotes,
    ligatures, widths and BOMs are all non-ASCII; line breaks and control characters are not printable)."""
    return text.isascii() and text.isprintable() and "&" not in text


def _merge_lines(vocab: Path) -> list[str]:
    """The merges of a gzipped BPE file, a line each after its header. Only the file's first fifth is inflated:
    the rest lists merges CLIP does not use (20 ms of a cold search)."""
    data, inflate = vocab.read_bytes(), zlib.decompressobj(wbits=31)  # 31: a gzip stream
    head = b""
    for start in range(0, len(data), 1 << 16):
        head += inflate.decompress(data[start : start + (1 << 16)])
        if head.count(b"\n") > _MERGES + 1:
            break
    lines = head[: head.rfind(b"\n") + 1].decode("utf-8")  # whole lines: a chunk may end inside a character
    return lines.split("\n", _MERGES + 1)[1 : _MERGES + 1]


class ClipTokenizer:
    """`tokenizer(texts)` → int64 array (N, context_length): start, the BPE ids, end, zero padding; a text too long
    is cut and ends with the end token."""

    def __init__(self, context_length: int = 77, vocab: Path | None = None):
        merges = _merge_lines(vocab or bundled_vocab())  # "a b": symbols hold no space (see _byte_alphabet)
        symbols = list(_byte_alphabet().values())
        names = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [SOT, EOT]
        self.ids = dict(zip(names, range(len(names)), strict=True))
        self.rank = dict(zip(merges, range(len(merges)), strict=True))  # a merge's line, not a tuple: 30 ms less
        self.sot, self.eot = self.ids[SOT], self.ids[EOT]
        self.context_length = context_length
        self.vocab_size = len(self.ids)
        self._words: dict[str, list[int]] = {SOT: [self.sot], EOT: [self.eot]}
        self._split = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
        )

    def encode(self, text: str) -> list[int]:
        alphabet = _byte_alphabet()
        out: list[int] = []
        for word in self._split.findall(clean(text)):
            if word not in self._words:
                self._words[word] = self._bpe("".join(alphabet[b] for b in word.encode("utf-8")))
            out.extend(self._words[word])
        return out

    def _bpe(self, word: str) -> list[int]:
        """Merge the word's adjacent symbols, the best-ranked pair everywhere first, until no pair is a merge."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.rank.get(f"{a} {b}", _MERGES), a, b) for a, b in itertools.pairwise(parts)]
            best, first, second = min(ranked)
            if best == _MERGES:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.ids[p] for p in parts]

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return out
