"""A minimal pure-Python reader of R's serialization format (XDR, versions 2 and 3) and lazy-load databases.

Enough for data packages such as janeaustenr: character/integer/double/logical/raw/complex vectors, lists,
pairlists with tags and attributes, symbols, reference slots, environments (as plain frames), CHARSXP
encodings, and the common ALTREP classes (compact sequences, deferred strings, wrappers). Byte code and
external pointers are not supported (they raise ``ValueError``).

A lazy-load database is a pair of files: ``<name>.rdx``, a serialized index (gzip, or a 4-byte big-endian
length followed by a zlib stream) whose ``variables`` entry maps object names to ``(offset, length)`` in
``<name>.rdb``; each ``.rdb`` chunk is again a 4-byte length plus a compressed serialization.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RObject", "RSymbol", "decompress_chunk", "read_lazyload_db", "unserialize"]

NA_INTEGER = -(2**31)

# SEXP types
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = (
    16,
    17,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
)
# pseudo types of the serialization stream
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP = (
    255,
    254,
    253,
    252,
    251,
    250,
)
NAMESPACESXP, PACKAGESXP, PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP = 249, 248, 247, 242, 241
ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 240, 239, 238

_VECTOR_NAMES = {
    LGLSXP: "logical",
    INTSXP: "integer",
    REALSXP: "double",
    CPLXSXP: "complex",
    STRSXP: "character",
    VECSXP: "list",
    EXPRSXP: "expression",
    RAWSXP: "raw",
}
_PAIR_NAMES = {
    LISTSXP: "pairlist",
    LANGSXP: "language",
    CLOSXP: "closure",
    PROMSXP: "promise",
    DOTSXP: "dots",
    ATTRLISTSXP: "pairlist",
    ATTRLANGSXP: "language",
}
_SPECIAL_VALUES = {
    GLOBALENV_SXP: "<globalenv>",
    UNBOUNDVALUE_SXP: "<unbound>",
    MISSINGARG_SXP: "<missing>",
    BASENAMESPACE_SXP: "<base namespace>",
    EMPTYENV_SXP: "<emptyenv>",
    BASEENV_SXP: "<baseenv>",
}


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (name)."""

    name: str


@dataclass
class RObject:
    """An R value: ``rtype`` (``character``, ``integer``, ``list``, ``pairlist``, ``environment``, ...), its
    ``value`` (a Python list for vectors, a list of ``(tag, value)`` for pairlists, a dict for environments)
    and its ``attributes`` (name -> value). ``NULL`` is returned as Python ``None`` and strings as ``str``
    (``NA`` as ``None``) inside the vectors."""

    rtype: str
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a list, or ``None``."""
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None

    def to_dict(self) -> dict[str, Any]:
        """A named list (or pairlist) as a dict name -> element."""
        if self.rtype in _PAIR_NAMES.values():
            return {tag: v for tag, v in self.value}
        names = self.names() or []
        return dict(zip(names, self.value, strict=False))


class _Reader:
    """Cursor over an XDR serialization stream."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"truncated R serialization: need {n} bytes at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints (upper, lower)
            upper, lower = self.int(), self.int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        return n

    def string(self) -> str:
        n = self.int()
        return self.take(n).decode("utf-8", errors="replace")


def _charsxp(r: _Reader, levels: int) -> str | None:
    """A CHARSXP: length -1 is NA; the encoding comes from the ``levels`` bits (UTF-8, latin1, bytes)."""
    n = r.int()
    if n == -1:
        return None
    raw = r.take(n)
    if levels & (1 << 2):  # LATIN1_MASK
        return raw.decode("latin-1")
    if levels & (1 << 1):  # BYTES_MASK
        return raw.decode("latin-1")
    return raw.decode("utf-8", errors="replace")


def _attributes(pairlist: Any) -> dict[str, Any]:
    """Convert an attribute pairlist to a dict."""
    if isinstance(pairlist, RObject) and pairlist.rtype in _PAIR_NAMES.values():
        return {tag: v for tag, v in pairlist.value}
    return {}


def _altrep(r: _Reader) -> Any:
    """Materialise the ALTREP classes base R writes: compact sequences, deferred strings and wrappers."""
    info, state, attr = _item(r), _item(r), _item(r)
    cls = info.value[0][1].name if isinstance(info, RObject) and info.value else "?"
    if cls == "compact_intseq":
        n, start, step = state.value
        out: Any = RObject("integer", [int(start + i * step) for i in range(int(n))])
    elif cls == "compact_realseq":
        n, start, step = state.value
        out = RObject("double", [start + i * step for i in range(int(n))])
    elif cls == "deferred_string":
        arg = state.value[0][1] if state.rtype == "pairlist" else state
        out = RObject("character", [None if _is_na(x, arg.rtype) else _fmt(x) for x in arg.value])
    elif cls.startswith("wrap_"):
        out = RObject(state.value[0].rtype, list(state.value[0].value), dict(state.value[0].attributes))
    else:
        raise ValueError(f"unsupported ALTREP class {cls!r}")
    out.attributes.update(_attributes(attr))
    return out


def _is_na(x: Any, rtype: str) -> bool:
    return x is None or (rtype == "integer" and x == NA_INTEGER) or (isinstance(x, float) and math.isnan(x))


def _fmt(x: Any) -> str:
    """R's as.character for a number (integers without a decimal point)."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _item(r: _Reader) -> Any:
    """Read one item of the stream (R's ReadItem)."""
    flags = r.int()
    sxp = flags & 0xFF
    levels = flags >> 12
    has_attr = bool(flags & (1 << 9))
    if sxp == NILVALUE_SXP:
        return None
    if sxp in _SPECIAL_VALUES:
        return RSymbol(_SPECIAL_VALUES[sxp])
    if sxp == REFSXP:
        index = flags >> 8
        if index == 0:
            index = r.int()
        return r.refs[index - 1]
    if sxp in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
        if r.int() != 0:
            raise ValueError("bad persistent-name string vector")
        names = [_item(r) for _ in range(r.int())]
        obj = RObject({PERSISTSXP: "persist", NAMESPACESXP: "namespace", PACKAGESXP: "package"}[sxp], names)
        r.refs.append(obj)
        return obj
    if sxp == SYMSXP:
        sym = RSymbol(_item(r) or "")
        r.refs.append(sym)
        return sym
    if sxp == ENVSXP:
        r.int()  # locked
        env = RObject("environment", {})
        r.refs.append(env)
        enclos, frame, hashtab, attr = _item(r), _item(r), _item(r), _item(r)
        env.value = _env_frame(frame, hashtab)
        env.attributes = {"enclos": enclos, **_attributes(attr)}
        return env
    if sxp in _PAIR_NAMES:
        return _pairlist(r, flags)
    if sxp == ALTREP_SXP:
        return _altrep(r)
    if sxp == CHARSXP:
        return _charsxp(r, levels)
    if sxp in (SPECIALSXP, BUILTINSXP):
        return RObject("builtin", r.take(r.int()).decode("ascii", errors="replace"))
    out: RObject
    if sxp == S4SXP:
        out = RObject("S4", None)
    elif sxp in (LGLSXP, INTSXP):
        n = r.length()
        vals = list(struct.unpack(f">{n}i", r.take(4 * n)))
        if sxp == LGLSXP:
            vals = [None if v == NA_INTEGER else bool(v) for v in vals]
        out = RObject(_VECTOR_NAMES[sxp], vals)
    elif sxp == REALSXP:
        n = r.length()
        out = RObject("double", list(struct.unpack(f">{n}d", r.take(8 * n))))
    elif sxp == CPLXSXP:
        n = r.length()
        parts = struct.unpack(f">{2 * n}d", r.take(16 * n))
        out = RObject("complex", [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)])
    elif sxp == STRSXP:
        out = RObject("character", [_item(r) for _ in range(r.length())])
    elif sxp in (VECSXP, EXPRSXP):
        out = RObject(_VECTOR_NAMES[sxp], [_item(r) for _ in range(r.length())])
    elif sxp == RAWSXP:
        out = RObject("raw", r.take(r.length()))
    else:
        raise ValueError(f"unsupported R SEXP type {sxp} in serialization (offset {r.pos - 4})")
    if has_attr:
        out.attributes = _attributes(_item(r))
    return out


def _pairlist(r: _Reader, flags: int) -> RObject:
    """A pairlist-like chain, read iteratively along the CDRs (long lists would overflow the recursion)."""
    sxp = flags & 0xFF
    attr: dict[str, Any] | None = None
    cells: list[tuple[str | None, Any]] = []
    while True:
        cell_attr = _attributes(_item(r)) if flags & (1 << 9) else {}
        attr = cell_attr if attr is None else attr  # only the head cell's attributes belong to the list
        tag = _item(r) if flags & (1 << 10) else None
        cells.append((tag.name if isinstance(tag, RSymbol) else None, _item(r)))
        if r.pos + 4 <= len(r.data):
            nxt = struct.unpack_from(">i", r.data, r.pos)[0]
            if nxt & 0xFF == sxp:  # the CDR continues the chain
                r.pos += 4
                flags = nxt
                continue
        cdr = _item(r)
        if cdr is not None:
            cells.append((None, cdr))  # dotted pair
        return RObject(_PAIR_NAMES[sxp], cells, attr)


def _env_frame(frame: Any, hashtab: Any) -> dict[str, Any]:
    """Bindings of a serialized environment (frame pairlist and/or hash table of pairlists)."""
    out: dict[str, Any] = {}
    chains = [frame] + (hashtab.value if isinstance(hashtab, RObject) and hashtab.rtype == "list" else [])
    for chain in chains:
        if isinstance(chain, RObject) and chain.rtype == "pairlist":
            out.update({tag: v for tag, v in chain.value if tag is not None})
    return out


def unserialize(data: bytes) -> Any:
    """Read one R object from a binary XDR serialization (``X\\n`` header, versions 2 and 3)."""
    if data[:2] != b"X\n":
        raise ValueError(f"only XDR R serializations are supported (header {data[:2]!r}, expected b'X\\n')")
    r = _Reader(data)
    r.pos = 2
    version = r.int()
    r.int(), r.int()  # writer version, minimal reader version
    if version == 3:
        r.take(r.int())  # native encoding name
    elif version != 2:
        raise ValueError(f"unsupported R serialization version {version}")
    return _item(r)


def decompress_chunk(chunk: bytes, compressed: int = 1) -> bytes:
    """Undo R's lazy-load compression: 4-byte big-endian length, then zlib (``compressed`` 1), or a type
    byte (``'Z'`` xz, ``'2'`` bzip2, ``'1'`` zlib, ``'0'`` none) and the data (``compressed`` 2 or 3)."""
    if chunk[:2] == b"\x1f\x8b":
        return gzip.decompress(chunk)
    size = struct.unpack(">I", chunk[:4])[0]
    body = chunk[4:]
    if compressed == 1 or body[:1] == b"\x78":  # a zlib stream always starts with 0x78 (32K window)
        out = zlib.decompress(body)
    else:
        kind, body = body[:1], body[1:]
        inflate = {b"Z": lzma.decompress, b"2": bz2.decompress, b"1": zlib.decompress, b"0": bytes}.get(kind)
        if inflate is None:
            raise ValueError(f"unknown lazy-load compression type byte {kind!r}")
        out = inflate(body)
    if len(out) != size:
        raise ValueError(f"lazy-load chunk inflates to {len(out)} bytes, header says {size}")
    return out


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """All variables of a lazy-load database (``.rdx`` index bytes, ``.rdb`` data bytes), name -> object."""
    index = unserialize(decompress_chunk(rdx)).to_dict()
    comp = index.get("compressed")
    compressed = int(comp.value[0]) if isinstance(comp, RObject) and comp.value else 1
    out: dict[str, Any] = {}
    for name, where in index["variables"].to_dict().items():
        offset, length = (int(x) for x in where.value)
        out[name] = unserialize(decompress_chunk(rdb[offset : offset + length], compressed))
    return out
