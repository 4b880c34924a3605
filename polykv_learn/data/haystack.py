"""Needle-in-a-haystack samples over natural text and code, with families and templates held out by split.

RULER (Hsieh et al., arXiv:2404.06654) hides needles in essays; the filler sentence of the pass-key tests ("The grass
is green. ...") is the easy case, where any attention outlier is the needle. Here the haystack is real text of a
*family* (``FAMILIES``: novels, news, encyclopedia passages, assistant commands, the repeated filler, the Python
reference manual, how-to articles, Python source), the needle is one of several *templates* (``NEEDLES``: phrasings
of a single pass key, or of keyed values), its value is digits, words or mixed (``VALUE_KINDS``), and it sits at a
uniform random depth, between two sentences (prose) or lines (code, as a comment).

Generalisation protocol: every family and every template belongs to one split (``HaystackFamily.split``,
``NeedleTemplate.split``). ``train`` records use training families (their training documents) and training
templates only; ``validation`` records use the validation family and templates (model selection on sources the
router never trained on); ``test`` records are half *held out* (a test family and a test template:
``heldout_sources`` is true) and half in-distribution (training families' test documents, training templates).

Kinds (``NEEDLE_KINDS``): ``passkey`` (one needle), ``multi_key_needle`` (four keyed needles, asks one),
``multi_value_needle`` (three values of one key among keyed distractors, asks all three), ``multi_query_needle``
(four keyed needles, asks two), ``variable_tracking`` (chains ``VAR B = VAR A`` of RULER's format).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from polykv_learn.data.sources import Document, LengthFn
from polykv_learn.data.synthetic import NOISE, random_key, random_number, random_var

__all__ = [
    "FAMILIES",
    "NEEDLES",
    "NEEDLE_KINDS",
    "VALUE_KINDS",
    "HaystackFamily",
    "NeedleSample",
    "NeedleTemplate",
    "families_for",
    "make_needle_sample",
    "templates_for",
]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class HaystackFamily:
    """A kind of haystack text: the document sources it draws from (none: the repeated filler) and its split."""

    name: str
    sources: tuple[str, ...]
    split: str  # "train": training (its test documents also serve the test split); else held out for that split
    code: bool = False  # needles enter as comment lines between lines instead of sentences


FAMILIES: dict[str, HaystackFamily] = {
    f.name: f
    for f in (
        HaystackFamily("novel", ("austen",), "train"),
        HaystackFamily("news", ("xsum",), "train"),
        HaystackFamily("encyclopedia", ("quoref",), "train"),
        HaystackFamily("commands", ("snips",), "train"),
        HaystackFamily("filler", (), "train"),
        HaystackFamily("reference", ("pydocs",), "validation"),
        HaystackFamily("howto", ("wikilingua",), "test"),
        HaystackFamily("code", ("python",), "test", code=True),
    )
}


@dataclass(frozen=True)
class NeedleTemplate:
    """A needle phrasing: ``text`` holds ``{value}`` (and ``{key}`` for keyed needles); ``attribute`` names what the
    question asks for (``What is the {attribute} ...``)."""

    name: str
    text: str
    attribute: str
    split: str

    @property
    def keyed(self) -> bool:
        return "{key}" in self.text


NEEDLES: tuple[NeedleTemplate, ...] = (
    NeedleTemplate(
        "single/pass-key", "The pass key is {value}. Remember it. {value} is the pass key.", "pass key", "train"
    ),
    NeedleTemplate(
        "single/door-code", "The secret code for the front door is {value}.", "secret code for the front door", "train"
    ),
    NeedleTemplate("single/access", "Remember this: the access number is {value}.", "access number", "train"),
    NeedleTemplate("single/vault", "Important: the vault combination is {value}.", "vault combination", "validation"),
    NeedleTemplate(
        "single/password", "Hidden in this text is a special password, and it is {value}.", "special password", "test"
    ),
    NeedleTemplate(
        "single/ticket",
        "Take note that the ticket number you will need later is {value}.",
        "ticket number you will need later",
        "test",
    ),
    NeedleTemplate(
        "keyed/magic", "One of the special magic numbers for {key} is: {value}.", "special magic number", "train"
    ),
    NeedleTemplate("keyed/assigned", "The code assigned to {key} is {value}.", "code assigned", "train"),
    NeedleTemplate(
        "keyed/secret", "Everyone knows that {key} keeps the secret value {value}.", "secret value", "train"
    ),
    NeedleTemplate(
        "keyed/locker", "The locker of {key} opens with the combination {value}.", "locker combination", "validation"
    ),
    NeedleTemplate(
        "keyed/registration", "Note that the registration id of {key} is {value}.", "registration id", "test"
    ),
    NeedleTemplate("keyed/records", "According to the records, {key} was given the serial {value}.", "serial", "test"),
)

VALUE_KINDS = ("digits", "words", "mixed")
NEEDLE_KINDS = ("passkey", "multi_key_needle", "multi_value_needle", "multi_query_needle", "variable_tracking")
_KEYED = {"multi_key_needle", "multi_value_needle", "multi_query_needle"}


def families_for(split: str, held_out: bool) -> list[HaystackFamily]:
    """Families a ``split`` record may use: ``held_out`` picks the split's own (validation/test) families, else the
    training families (the only choice of the train split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    own = "train" if split == "train" or not held_out else split
    return [f for f in FAMILIES.values() if f.split == own]


def templates_for(kind: str, split: str, held_out: bool) -> list[NeedleTemplate]:
    """Needle templates of ``kind`` for a ``split`` record (``held_out`` as in :func:`families_for`)."""
    own = "train" if split == "train" or not held_out else split
    keyed = kind in _KEYED
    return [t for t in NEEDLES if t.keyed == keyed and t.split == own]


def random_value(rng: random.Random, kind: str) -> str:
    """A needle value: ``digits`` (5-7 digits), ``words`` (two words, e.g. ``cedar-lagoon``) or ``mixed``
    (letters and digits, e.g. ``K7Q-3M9X``)."""
    if kind == "digits":
        return random_number(rng, rng.randint(5, 7))
    if kind == "words":
        return random_key(rng)
    if kind == "mixed":
        chars = string.ascii_uppercase + string.digits
        return "".join(rng.choice(chars) for _ in range(3)) + "-" + "".join(rng.choice(chars) for _ in range(4))
    raise ValueError(f"unknown value kind {kind!r}; allowed: {', '.join(VALUE_KINDS)}")


@dataclass
class NeedleSample:
    """A built haystack with its question (``prefix``: an answer prefix restating it, RULER style)."""

    context: str
    question: str
    answers: list[str]
    prefix: str
    family: str
    template: str
    value_kind: str
    doc_ids: list[str]


_SENTENCE = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])\s+(?=[\"'A-Z0-9])")


def _units(doc: Document, code: bool) -> list[str]:
    """A document cut where a needle may go: lines of code, sentences of prose (paragraph ends kept as ``\\n\\n``)."""
    if code:
        return [line + "\n" for line in doc.text.split("\n")]
    out: list[str] = []
    for para in re.split(r"\n\s*\n", doc.text):
        sentences = [s.strip() for s in _SENTENCE.split(para.strip()) if s.strip()]
        if sentences:
            out += [s + " " for s in sentences[:-1]] + [sentences[-1] + "\n\n"]
    return out


def _haystack_units(
    family: HaystackFamily, docs: Sequence[Document], rng: random.Random, length_fn: LengthFn, budget: int
) -> tuple[list[str], list[str]]:
    """(units, doc ids): text of ``family`` of about ``budget`` tokens, from random documents (a random start in
    the first), in order."""
    if not family.sources:
        return [NOISE + " "] * max(1, round(budget / max(length_fn(NOISE), 1))), []
    if not docs:
        raise ValueError(f"haystack family {family.name!r} has no documents")
    units: list[str] = []
    ids: list[str] = []
    total = 0
    order = rng.sample(list(docs), min(len(docs), 200))
    for i, doc in enumerate(order):
        doc_units = _units(doc, family.code)
        start = rng.randrange(len(doc_units)) if i == 0 and len(doc_units) > 1 else 0
        ids.append(doc.doc_id)
        for unit in doc_units[start:]:
            units.append(unit)
            total += length_fn(unit)
            if total >= budget:
                return units, ids
        if not family.code and units and not units[-1].endswith("\n\n"):
            units[-1] = units[-1].rstrip() + "\n\n"
    return units, ids


def _place(units: list[str], needles: Sequence[str], rng: random.Random, code: bool) -> str:
    """Insert each needle at a uniform random boundary between units (code: a comment line with the indentation
    of the line after it); the keyed needles keep their order of insertion random."""
    parts = list(units)
    for needle in needles:
        at = rng.randint(0, len(parts))
        if code:
            nxt = parts[at] if at < len(parts) else ""
            indent = nxt[: len(nxt) - len(nxt.lstrip(" "))]
            parts.insert(at, f"{indent}# {needle}\n")
        else:
            parts.insert(at, needle + " ")
    return "".join(parts).strip()


def _values(rng: random.Random, kind: str, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = random_value(rng, kind)
        if v not in out:
            out.append(v)
    return out


def _keys(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = random_key(rng)
        if k not in out:
            out.append(k)
    return out


def make_needle_sample(
    kind: str,
    rng: random.Random,
    family: HaystackFamily,
    template: NeedleTemplate,
    docs: Sequence[Document],
    length_fn: LengthFn,
    target: int,
) -> NeedleSample:
    """A ``kind`` sample (``NEEDLE_KINDS``) of about ``target`` tokens: ``family`` text from ``docs`` with the needles
    of ``template`` (ignored by ``variable_tracking``, whose statements follow RULER). Deterministic for ``rng``."""
    if kind not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; allowed: {', '.join(NEEDLE_KINDS)}")
    if kind != "variable_tracking" and template.keyed != (kind in _KEYED):
        raise ValueError(f"template {template.name!r} does not fit kind {kind!r}")
    value_kind = rng.choice(VALUE_KINDS)
    attr = template.attribute
    if kind == "passkey":
        (value,) = _values(rng, value_kind, 1)
        needles = [template.text.format(value=value)]
        question, prefix, answers = f"What is the {attr}?", f"The {attr} is", [value]
    elif kind == "variable_tracking":
        needles, question, prefix, answers = _variable_chains(rng)
        value_kind, template = "digits", NeedleTemplate("variables/ruler", "VAR {key} = {value}.", "value", "test")
    else:
        n_keys = 4
        keys = _keys(rng, n_keys)
        values = _values(rng, value_kind, n_keys + 2)
        pairs = list(zip(keys, values, strict=False))
        if kind == "multi_value_needle":  # three values of the first key, the other keys as distractors
            pairs = [(keys[0], values[i]) for i in range(3)] + [
                (k, v) for k, v in zip(keys[1:], values[3:], strict=False)
            ]
        needles = [template.text.format(key=k, value=v) for k, v in pairs]
        rng.shuffle(needles)
        if kind == "multi_key_needle":
            k, v = rng.choice(pairs)
            question = f"What is the {attr} for {k} mentioned in the text?"
            prefix, answers = f"The {attr} for {k} mentioned in the text is", [v]
        elif kind == "multi_value_needle":
            question = f"What are all the {attr} values for {keys[0]} mentioned in the text?"
            prefix, answers = f"The {attr} values for {keys[0]} mentioned in the text are", [v for _, v in pairs[:3]]
        else:
            (k1, v1), (k2, v2) = rng.sample(pairs, 2)
            question = f"What are the {attr} values for {k1} and {k2} mentioned in the text?"
            prefix, answers = f"The {attr} values for {k1} and {k2} mentioned in the text are", [v1, v2]
    budget = max(1, target - sum(length_fn(n) for n in needles))
    units, ids = _haystack_units(family, docs, rng, length_fn, budget)
    if kind == "variable_tracking":  # chains in order: sorted depths keep each chain's assignments in sequence
        context = _place_in_order(units, needles, rng)
    else:
        context = _place(units, needles, rng, family.code)
    return NeedleSample(context, question, answers, prefix, family.name, template.name, value_kind, ids)


def _variable_chains(rng: random.Random, hops: int = 4, chains: int = 3) -> tuple[list[str], str, str, list[str]]:
    """RULER variable tracking: ``chains`` chains of ``hops`` assignments; asks for every variable of one chain."""
    names: list[str] = []
    while len(names) < hops * chains:
        v = random_var(rng)
        if v not in names:
            names.append(v)
    values = _values(rng, "digits", chains)
    statements: list[str] = []
    for c in range(chains):
        group = names[c * hops : (c + 1) * hops]
        statements += [f"VAR {group[0]} = {values[c]}."] + [
            f"VAR {group[h]} = VAR {group[h - 1]}." for h in range(1, hops)
        ]
    c = rng.randrange(chains)
    question = f"Find all variables that are assigned the value {values[c]} in the text above."
    prefix = (
        f"According to the chain of variable assignments in the text above, {hops} variables are assigned the value"
        f" {values[c]}, they are:"
    )
    return statements, question, prefix, names[c * hops : (c + 1) * hops]


def _place_in_order(units: list[str], statements: Sequence[str], rng: random.Random) -> str:
    """Insert ``statements`` at sorted random boundaries (their order kept), each chain's order preserved."""
    # interleave chains: statements come grouped by chain; sorted random depths per chain keep each chain in order
    hops = 4
    placed: list[tuple[int, int, str]] = []
    for c in range(0, len(statements), hops):
        depths = sorted(rng.randint(0, len(units)) for _ in range(hops))
        placed += [(d, c + h, statements[c + h]) for h, d in enumerate(depths)]
    placed.sort()
    parts: list[str] = []
    j = 0
    for b in range(len(units) + 1):
        while j < len(placed) and placed[j][0] == b:
            parts.append(placed[j][2] + " ")
            j += 1
        if b < len(units):
            parts.append(units[b])
    return "".join(parts).strip()


def family_documents(family: HaystackFamily, documents_by_source: Mapping[str, Sequence[Document]]) -> list[Document]:
    """The documents of ``family`` (all its sources), sorted by id."""
    return sorted((d for s in family.sources for d in documents_by_source.get(s, ())), key=lambda d: d.doc_id)
