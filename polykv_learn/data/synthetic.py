"""Generated retrieval texts from a seeded ``random.Random``: pass keys, multi-key and multi-query needles,
key-value JSON, variable chains (RULER/LongBench-style); nothing is downloaded. Every function is deterministic
for its seed.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Sequence

from polykv_learn.data.sources import Document, LengthFn, QAPair, approx_tokens

__all__ = [
    "NOISE",
    "SYNTHETIC_KINDS",
    "make_kv_lookup",
    "make_multi_key_needle",
    "make_multi_query_needle",
    "make_passkey",
    "make_variable_tracking",
    "random_key",
    "random_number",
    "random_uuid",
    "random_var",
    "sized_synthetic",
    "synthetic_documents",
]


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""The haystack sentence group of the passkey tests (LongBench/RULER); repeated as filler."""

_WORDS = (
    "amber badge cedar delta ember falcon garnet harbor island jasper kettle lantern meadow nickel orchid "
    "pepper quartz raven saddle timber umber velvet willow yonder zephyr anchor bramble copper dune ferret "
    "glacier hollow indigo juniper kiwi lagoon marble nectar oyster pebble quill ridge spruce thistle "
    "tundra vapor walnut acorn beacon canyon"
).split()


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A random decimal string of exactly ``digits`` digits (no leading zero)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def random_uuid(rng: random.Random) -> str:
    """A random UUID-shaped hex string (8-4-4-4-12)."""
    hexes = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{hexes[:8]}-{hexes[8:12]}-{hexes[12:16]}-{hexes[16:20]}-{hexes[20:]}"


def random_key(rng: random.Random) -> str:
    """A random two-word key such as ``amber-falcon``."""
    return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"


def random_var(rng: random.Random) -> str:
    """A random five-letter upper-case variable name."""
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _insert(rng: random.Random, filler: list[str], needles: Sequence[str]) -> str:
    """Insert each needle at a random boundary between filler groups (depth uniform) and join by spaces."""
    parts = list(filler)
    for needle in needles:
        parts.insert(rng.randint(0, len(parts)), needle)
    return " ".join(parts)


def make_passkey(rng: random.Random, size: int) -> tuple[str, QAPair]:
    """A haystack of ``size`` noise groups with one pass key at a random depth."""
    key = random_number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    text = _insert(rng, [NOISE] * size, [needle])
    return text, QAPair("What is the pass key?", (key,), "The pass key is")


def make_multi_key_needle(rng: random.Random, size: int, n_keys: int = 4) -> tuple[str, QAPair]:
    """``n_keys`` needles 'One of the special magic numbers for <key> is: <value>.'; asks for one key."""
    keys: list[str] = []
    while len(keys) < n_keys:
        k = random_key(rng)
        if k not in keys:
            keys.append(k)
    values = [random_number(rng) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
    text = _insert(rng, [NOISE] * size, needles)
    i = rng.randrange(n_keys)
    return text, QAPair(
        f"What is the special magic number for {keys[i]} mentioned in the text?",
        (values[i],),
        f"The special magic number for {keys[i]} mentioned in the text is",
    )


def make_multi_query_needle(rng: random.Random, size: int, n_keys: int = 4) -> tuple[str, QAPair]:
    """RULER's multi-query needle: the haystack of :func:`make_multi_key_needle`, but the question asks for the
    magic numbers of two keys at once (the answers are both numbers; the score is the share found)."""
    text, _ = make_multi_key_needle(rng, size, n_keys)
    found = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", text)
    (k1, v1), (k2, v2) = rng.sample(found, 2)
    return text, QAPair(
        f"What are the special magic numbers for {k1} and {k2} mentioned in the text?",
        (v1, v2),
        f"The special magic numbers for {k1} and {k2} mentioned in the text are",
    )


def make_kv_lookup(rng: random.Random, size: int) -> tuple[str, QAPair]:
    """A JSON object of ``size`` random UUID keys -> UUID values; asks for the value of one key."""
    pairs: dict[str, str] = {}
    while len(pairs) < max(size, 1):
        pairs[random_uuid(rng)] = random_uuid(rng)
    key = rng.choice(list(pairs))
    question = f'Extract the value corresponding to the specified key in the JSON object above. Key: "{key}"'
    return json.dumps(pairs, indent=1), QAPair(question, (pairs[key],))


def make_variable_tracking(rng: random.Random, size: int, hops: int = 4, chains: int = 3) -> tuple[str, QAPair]:
    """RULER variable tracking: ``chains`` chains ``VAR A = 12345``, ``VAR B = VAR A``, ... of ``hops``
    assignments each, interleaved in order within ``size`` noise groups; asks for every variable of one chain
    (the answers are all its variable names)."""
    names: list[str] = []
    while len(names) < hops * chains:
        v = random_var(rng)
        if v not in names:
            names.append(v)
    values: list[str] = []
    while len(values) < chains:
        v = random_number(rng, 5)
        if v not in values:
            values.append(v)
    # each chain's statements get sorted random depths in [0, 1), which keeps every chain in order
    placed: list[tuple[float, str]] = []
    for c in range(chains):
        group = names[c * hops : (c + 1) * hops]
        texts = [f"VAR {group[0]} = {values[c]}."] + [f"VAR {group[h]} = VAR {group[h - 1]}." for h in range(1, hops)]
        placed += zip(sorted(rng.random() for _ in range(hops)), texts, strict=True)
    placed.sort()
    parts: list[str] = []
    for b in range(size + 1):
        parts += [t for depth, t in placed if int(depth * (size + 1)) == b]
        if b < size:
            parts.append(NOISE)
    c = rng.randrange(chains)
    question = f"Find all variables that are assigned the value {values[c]} in the text above."
    prefix = (  # RULER's answer prefix
        f"According to the chain of variable assignments in the text above, {hops} variables are assigned the value"
        f" {values[c]}, they are:"
    )
    return " ".join(parts), QAPair(question, tuple(names[c * hops : (c + 1) * hops]), prefix)


SYNTHETIC_KINDS = {
    "passkey": make_passkey,
    "multi_key_needle": make_multi_key_needle,
    "kv_lookup": make_kv_lookup,
    "variable_tracking": make_variable_tracking,
    "multi_query_needle": make_multi_query_needle,
}
"""Synthetic generator of each kind: ``fn(rng, size) -> (text, QAPair)``; ``size`` scales the length."""


def sized_synthetic(
    kind: str, seed: str | int, length_fn: LengthFn, target: int, tolerance: float = 0.05
) -> tuple[str, QAPair, int]:
    """A synthetic ``kind`` text of about ``target`` tokens under ``length_fn``: the generator's ``size`` is
    rescaled (length is near-linear in it) until within ``tolerance`` of the target or 8 tries are spent.
    Every try reseeds with ``seed``, so the result is deterministic. Returns ``(text, qa, tokens)``."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; allowed: {sorted(SYNTHETIC_KINDS)}")
    make = SYNTHETIC_KINDS[kind]
    size, best = 8, None
    for _ in range(8):
        text, qa = make(random.Random(f"{kind}:{seed}"), size)
        n = length_fn(text)
        if best is None or abs(n - target) < abs(best[2] - target):
            best = (text, qa, n)
        if abs(n - target) <= tolerance * target:
            break
        size = max(1, round(size * target / max(n, 1)))
    assert best is not None
    return best


def synthetic_documents(
    n: int,
    seed: int = 0,
    kinds: Sequence[str] = ("passkey", "multi_key_needle", "kv_lookup"),
    length_fn: LengthFn = approx_tokens,
    tokens: tuple[int, int] = (512, 4096),
) -> list[Document]:
    """``n`` generated documents cycling through ``kinds`` (see ``SYNTHETIC_KINDS``), each with one QA pair
    and a length drawn uniformly from ``tokens`` (measured with ``length_fn``, kept in ``meta['tokens']``)."""
    unknown = sorted(set(kinds) - set(SYNTHETIC_KINDS))
    if unknown:
        raise ValueError(f"unknown synthetic kinds {unknown}; allowed: {sorted(SYNTHETIC_KINDS)}")
    rng = random.Random(f"synthetic:{seed}")
    docs = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        # aim inside the range so that the tolerance cannot push the length out of it
        target = rng.randint(tokens[0], tokens[1])
        target = min(max(target, round(tokens[0] * 1.06)), round(tokens[1] * 0.94))
        text, qa, count = sized_synthetic(kind, f"{seed}:{i}", length_fn, target)
        doc_id = f"synthetic/{kind}/{seed}-{i:05d}"
        docs.append(Document(doc_id, "synthetic", kind, text, qa=(qa,), meta={"kind": kind, "tokens": str(count)}))
    return docs
