"""Raw text sources, all obtainable offline from package registries, each returned as a list of ``Document``.

=================  ===========================================================================================
source             where it comes from
=================  ===========================================================================================
``quoref``         BIG-bench sdist on PyPI (``bigbench==1.0.0``), task
                   ``natural_instructions/subtask002_quoref_answer_generation``: Wikipedia passages with
                   span-answer questions (single-span questions only; one document per distinct passage)
``xsum``           BIG-bench ``gem/xsum``: BBC articles with their one-sentence reference summary
``wikilingua``     BIG-bench ``gem/wikilingua_en``: WikiHow articles with a short reference summary
``snips``          BIG-bench ``intent_recognition``: SNIPS utterances labelled with one of 7 intents
``austen``         Debian package ``r-cran-janeaustenr``: Jane Austen's six novels (public domain), read from
                   the R lazy-load database inside the .deb with a pure-Python R unserializer
``python``         Python source files of the running interpreter's standard library
``synthetic``      generated from a seeded ``random.Random`` (pass keys, multi-key needles, key-value JSON,
                   variable chains); no download
=================  ===========================================================================================

Downloads (``polykv_learn.data.downloads``, re-exported here) land in ``$POLYKV_HOME/raw`` (default
``~/.cache/polykv-learn/raw``) and are reused. The BIG-bench
JSON files are read straight from the ``.tar.gz`` (nothing is extracted or imported). Every function returns
documents in a deterministic order.
"""

from __future__ import annotations

import functools
import io
import json
import math
import random
import re
import string
import sysconfig
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polykv_learn.data.downloads import fetch_bigbench, fetch_janeaustenr, raw_dir
from polykv_learn.data.rdata import read_lazyload_db

__all__ = [
    "LengthFn",
    "approx_tokens",
    "sized_synthetic",
    "AUSTEN_NOVELS",
    "BIGBENCH_TASKS",
    "NOISE",
    "SYNTHETIC_KINDS",
    "Document",
    "QAPair",
    "austen_chapters",
    "austen_documents",
    "bigbench_documents",
    "fetch_bigbench",
    "fetch_janeaustenr",
    "make_kv_lookup",
    "make_multi_key_needle",
    "make_passkey",
    "make_variable_tracking",
    "python_documents",
    "random_key",
    "random_number",
    "random_uuid",
    "random_var",
    "raw_dir",
    "read_deb_member",
    "synthetic_documents",
]


@dataclass(frozen=True)
class QAPair:
    """One question about a document; any of ``answers`` is a correct reply and each occurs in the text."""

    question: str
    answers: tuple[str, ...]
    prefix: str = ""  # an answer prefix that restates the question (helps small models); "" = the task default


@dataclass(frozen=True)
class Document:
    """A raw text with optional supervision: QA pairs (``qa``), a reference ``summary``, a class ``label``."""

    doc_id: str
    source: str
    title: str
    text: str
    qa: tuple[QAPair, ...] = ()
    summary: str = ""
    label: str = ""
    meta: dict[str, str] = field(default_factory=dict, compare=False)


LengthFn = Callable[[str], int]
"""Token count of a text (the integrator passes a tokenizer-based one)."""


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate: 1.3 tokens per whitespace-separated word (rounded up)."""
    return math.ceil(1.3 * len(text.split()))


# ----------------------------------------------------------------------------------------------- BIG-bench

BIGBENCH_TASKS: dict[str, str] = {
    "quoref": "natural_instructions/subtask002_quoref_answer_generation",
    "xsum": "gem/xsum",
    "wikilingua": "gem/wikilingua_en",
    "snips": "intent_recognition",
}
"""Source name -> BIG-bench task directory (under ``bigbench/benchmark_tasks/``) used for it."""


@functools.lru_cache(maxsize=4)
def _read_bigbench_tasks(sdist: str, tasks: tuple[str, ...]) -> dict[str, dict]:
    """Parse the ``task.json`` of each task folder in ``tasks`` from the sdist, in one pass over the tar."""
    wanted = {f"bigbench/benchmark_tasks/{t}/task.json": t for t in tasks}
    out: dict[str, dict] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            rel = member.name.split("/", 1)[-1]  # drop the "bigbench-1.0.0/" root
            if rel in wanted:
                handle = tar.extractfile(member)
                assert handle is not None
                out[wanted[rel]] = json.load(handle)
                if len(out) == len(wanted):
                    break
    missing = sorted(set(tasks) - set(out))
    if missing:
        raise RuntimeError(f"{sdist} has no task.json for {missing}")
    return out


def _targets(example: dict) -> list[str]:
    """The gold targets of a BIG-bench example as a list of strings."""
    target = example.get("target", [])
    return [target] if isinstance(target, str) else [str(t) for t in target]


def _title(text: str, words: int = 8) -> str:
    """A short title: the first ``words`` words of the text."""
    head = text.split()[:words]
    return " ".join(head) + (" ..." if len(text.split()) > words else "")


def _quoref(task: dict) -> list[Document]:
    """One document per distinct Quoref passage, carrying its single-span questions."""
    passages: dict[str, list[QAPair]] = {}
    for ex in task["examples"]:
        body = ex["input"].removeprefix("Passage: ")
        if "\nQuestion:" not in body:
            continue
        passage, question = body.rsplit("\nQuestion:", 1)
        passage, question = passage.strip(), question.strip()
        targets = _targets(ex)
        if len(targets) != 1:  # multi-span answers are conjunctions, not alternatives: skip them
            continue
        answer = targets[0].strip().removesuffix(".").strip()
        if not answer or answer not in passage:
            continue
        passages.setdefault(passage, []).append(QAPair(question, (answer,)))
    return [
        Document(f"quoref/{i:05d}", "quoref", _title(p), p, qa=tuple(qas))
        for i, (p, qas) in enumerate(passages.items())
    ]


def _summaries(task: dict, source: str) -> list[Document]:
    """One document per article with its reference summary (duplicate articles and summaries shorter than
    six words or ending with a colon are dropped)."""
    seen: set[str] = set()
    docs = []
    for ex in task["examples"]:
        text, targets = ex["input"].strip(), _targets(ex)
        summary = targets[0].strip() if targets else ""
        # a few references are headings ("A chronology of key events:"), not summaries
        if not text or len(summary.split()) < 6 or summary.endswith(":") or text in seen:
            continue
        seen.add(text)
        docs.append(Document(f"{source}/{len(docs):05d}", source, _title(text), text, summary=summary))
    return docs


def _snips(task: dict) -> list[Document]:
    """One document per SNIPS utterance, labelled with its intent; ``meta['classes']`` holds the label set
    (comma-separated) and ``meta['label_name']`` the word ``Intent``."""
    docs = []
    for ex in task["examples"]:
        scores = ex["target_scores"]
        label = max(scores, key=scores.get)
        text = ex["input"].removeprefix("Utterance:").strip()
        classes = ",".join(scores)
        docs.append(
            Document(
                f"snips/{len(docs):05d}",
                "snips",
                text,
                text,
                label=label,
                meta={"classes": classes, "label_name": "Intent"},
            )
        )
    return docs


def bigbench_documents(sdist: Path | None = None, cache_dir: Path | None = None) -> dict[str, list[Document]]:
    """Documents of each source in ``BIGBENCH_TASKS`` (keys ``quoref``, ``xsum``, ``wikilingua``, ``snips``).

    ``sdist`` defaults to the cached download (see ``fetch_bigbench``)."""
    path = Path(sdist) if sdist is not None else fetch_bigbench(cache_dir)
    tasks = _read_bigbench_tasks(str(path), tuple(BIGBENCH_TASKS.values()))
    by_name = {name: tasks[task] for name, task in BIGBENCH_TASKS.items()}
    return {
        "quoref": _quoref(by_name["quoref"]),
        "xsum": _summaries(by_name["xsum"], "xsum"),
        "wikilingua": _summaries(by_name["wikilingua"], "wikilingua"),
        "snips": _snips(by_name["snips"]),
    }


# ----------------------------------------------------------------------------------------------- Jane Austen

AUSTEN_NOVELS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
"""R object name in janeaustenr -> title, in publication order."""


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container format of .deb files)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (missing '!<arch>' magic)")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += 60
        out[name] = data[pos : pos + size]
        pos += size + (size % 2)
    return out


def read_deb_member(deb: Path | bytes, suffix: str) -> bytes:
    """Bytes of the one file in a .deb's ``data.tar.*`` whose path ends with ``suffix``."""
    raw = deb if isinstance(deb, bytes) else Path(deb).read_bytes()
    members = _ar_members(raw)
    names = [n for n in members if n.startswith("data.tar")]
    if not names:
        raise ValueError(f"no data.tar.* in the .deb (members: {sorted(members)})")
    with tarfile.open(fileobj=io.BytesIO(members[names[0]]), mode="r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(suffix):
                handle = tar.extractfile(member)
                assert handle is not None
                return handle.read()
    raise KeyError(f"no file ending with {suffix!r} in the .deb's {names[0]}")


def _paragraphs(lines: Iterable[str]) -> list[str]:
    """Join hard-wrapped lines into paragraphs (blank lines separate paragraphs)."""
    paras, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paras.append(" ".join(current))
            current = []
    if current:
        paras.append(" ".join(current))
    return paras


def austen_documents(deb: Path | None = None, cache_dir: Path | None = None) -> list[Document]:
    """Jane Austen's six novels, one document each; paragraphs separated by a blank line."""
    path = Path(deb) if deb is not None else fetch_janeaustenr(cache_dir)
    raw = path.read_bytes()
    objects = read_lazyload_db(read_deb_member(raw, "data/Rdata.rdx"), read_deb_member(raw, "data/Rdata.rdb"))
    docs = []
    for name, title in AUSTEN_NOVELS.items():
        if name not in objects:
            raise KeyError(f"{path} has no R object {name!r} (found {sorted(objects)})")
        lines = [s or "" for s in objects[name].value]
        docs.append(Document(f"austen/{name}", "austen", title, "\n\n".join(_paragraphs(lines))))
    return docs


_CHAPTER = re.compile(r"^chapter\s+([0-9]+|[IVXLC]+)\.?$", re.IGNORECASE)


def austen_chapters(novel: Document) -> list[Document]:
    """Split a novel (from ``austen_documents``) into chapter documents ``austen/<novel>/chNN``.

    Chapters are numbered consecutively through the book (volume headings are dropped)."""
    chapters: list[list[str]] = []
    for para in novel.text.split("\n\n"):
        if _CHAPTER.match(para.strip()):
            chapters.append([])
        elif chapters and not para.strip().upper().startswith("VOLUME"):
            chapters[-1].append(para)
    return [
        Document(f"{novel.doc_id}/ch{i + 1:02d}", novel.source, f"{novel.title}, chapter {i + 1}", "\n\n".join(c))
        for i, c in enumerate(chapters)
        if c
    ]


# ----------------------------------------------------------------------------------------------- Python code


def python_documents(root: Path | None = None, min_lines: int = 200, max_files: int | None = None) -> list[Document]:
    """Python source files under ``root`` (default: the stdlib) with at least ``min_lines`` lines.

    Files are taken in sorted relative-path order; ``site-packages``, test suites, ``idlelib`` and other
    non-library folders (and ``encodings``, mostly generated tables) are skipped, as are files that are not
    valid UTF-8."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    skip = {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "__pycache__",
        "lib2to3",
        "ensurepip",
        "encodings",
    }
    docs = []
    for path in sorted(base.rglob("*.py"), key=lambda p: p.relative_to(base).as_posix()):
        rel = path.relative_to(base).as_posix()
        if skip.intersection(rel.split("/")[:-1]) or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.count("\n") + 1 < min_lines:
            continue
        docs.append(Document(f"python/{rel}", "python", rel, text))
        if max_files is not None and len(docs) >= max_files:
            break
    return docs


# ----------------------------------------------------------------------------------------------- synthetic

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
