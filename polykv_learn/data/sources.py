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
``pydocs``         the Python reference manual's topics shipped with the interpreter (``pydoc_data.topics``)
=================  ===========================================================================================

Generated texts (pass keys, needles, key-value JSON, variable chains) are in ``polykv_learn.data.synthetic``.
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
import re
import sysconfig
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from polykv_learn.data.downloads import fetch_bigbench, fetch_janeaustenr, raw_dir
from polykv_learn.data.rdata import read_lazyload_db

__all__ = [
    "LengthFn",
    "approx_tokens",
    "AUSTEN_NOVELS",
    "BIGBENCH_TASKS",
    "Document",
    "QAPair",
    "austen_chapters",
    "austen_documents",
    "bigbench_documents",
    "fetch_bigbench",
    "fetch_janeaustenr",
    "pydoc_documents",
    "python_documents",
    "raw_dir",
    "read_deb_member",
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
        "pydoc_data",  # the reference manual as data: the ``pydocs`` source
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


def pydoc_documents() -> list[Document]:
    """The topics of the Python reference manual that ship with the interpreter (``pydoc_data.topics``: prose about
    the language, with grammar excerpts), one document per topic, in sorted topic order."""
    from pydoc_data.topics import topics

    return [Document(f"pydocs/{name}", "pydocs", name, text.strip()) for name, text in sorted(topics.items())]
