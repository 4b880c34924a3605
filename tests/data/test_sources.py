"""Raw sources on tiny hand-built fixtures (R XDR blobs, a .deb, a BIG-bench sdist), download errors and
synthetic generators; plus checks on the real cached downloads when present (never downloaded here)."""

import bz2
import gzip
import io
import json
import lzma
import random
import re
import struct
import subprocess
import tarfile
import zlib

import pytest

from polykv_learn.data import downloads
from polykv_learn.data.rdata import RObject, RSymbol, decompress_chunk, read_lazyload_db, unserialize
from polykv_learn.data.sources import (
    AUSTEN_NOVELS,
    approx_tokens,
    austen_chapters,
    austen_documents,
    bigbench_documents,
    fetch_bigbench,
    fetch_janeaustenr,
    python_documents,
    raw_dir,
)
from polykv_learn.data.synthetic import (
    make_kv_lookup,
    make_multi_key_needle,
    make_passkey,
    make_variable_tracking,
    sized_synthetic,
    synthetic_documents,
)

# ----------------------------------------------------------------------------------------------- R XDR writer


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 3) -> bytes:
    out = b"X\n" + i32(version, 0x040201, 0x030500)
    return out + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(s: str | None, utf8: bool = True) -> bytes:
    if s is None:
        return i32(9, -1)
    raw = s.encode("utf-8" if utf8 else "latin-1")
    levels = 8 if utf8 else 4  # UTF8_MASK, LATIN1_MASK
    return i32(9 | (levels << 12), len(raw)) + raw


def strsxp(values, attrs: bytes = b"") -> bytes:
    flags = 16 | (1 << 9 if attrs else 0)
    return i32(flags, len(values)) + b"".join(charsxp(v) for v in values) + attrs


def intsxp(values, attrs: bytes = b"") -> bytes:
    return i32(13 | (1 << 9 if attrs else 0), len(values), *values) + attrs


def symbol(name: str) -> bytes:
    return i32(1) + charsxp(name)


def pairlist(items) -> bytes:
    """Tagged pairlist (tag: bytes of a SYMSXP or REFSXP, value bytes), terminated by NILVALUE."""
    out = b""
    for tag, value in items:
        out += i32(2 | (1 << 10)) + tag + value
    return out + i32(254)


def names_attr(names, refs=None) -> bytes:
    return pairlist([(refs or symbol("names"), strsxp(names))])


def vecsxp(values, names=None) -> bytes:
    attrs = names_attr(names) if names else b""
    return i32(19 | (1 << 9 if attrs else 0), len(values)) + b"".join(values) + attrs


def lazyload_db(objects: dict[str, bytes]):
    """(.rdx bytes, .rdb bytes) holding each serialized object, zlib chunks and a gzip index."""
    rdb, offsets = b"", {}
    for name, blob in objects.items():
        chunk = struct.pack(">I", len(blob)) + zlib.compress(blob)
        offsets[name] = (len(rdb), len(chunk))
        rdb += chunk
    variables = vecsxp([intsxp(list(v)) for v in offsets.values()], list(offsets))
    index = header() + vecsxp([variables, vecsxp([]), i32(10, 1, 1)], ["variables", "references", "compressed"])
    return gzip.compress(index), rdb


# ----------------------------------------------------------------------------------------------- unserializer


def test_unserialize_hand_written_bytes():
    # character vector c("a") in XDR format 2: CHARSXP flagged ASCII (levels 64)
    blob = b"X\n" + i32(2, 0x040201, 0x020300) + i32(16, 1) + i32(9 | (64 << 12), 1) + b"a"
    assert unserialize(blob) == RObject("character", ["a"])


def test_unserialize_vectors_encodings_na_and_refs():
    latin = i32(9 | (4 << 12), 1) + "é".encode("latin-1")
    lines = i32(16, 4) + charsxp("Emma Woodhouse") + charsxp("") + charsxp(None) + latin
    ints = intsxp([1, -(2**31), 3])
    # the first "names" symbol becomes reference 1; the second is a back-reference (REFSXP, index in flags)
    first = strsxp(["w"], names_attr(["k0"]))
    nested = vecsxp([first, strsxp(["x"], names_attr(["k"], i32(255 | (1 << 8)))), ints], None)
    blob = header() + vecsxp([i32(16, 0) + b"", lines, nested], ["empty", "lines", "nested"])
    obj = unserialize(blob)
    assert obj.rtype == "list" and obj.names() == ["empty", "lines", "nested"]
    data = obj.to_dict()
    assert data["empty"].value == []
    assert data["lines"].value == ["Emma Woodhouse", "", None, "é"]
    _, inner_str, inner_int = data["nested"].value
    assert inner_str.value == ["x"] and inner_str.names() == ["k"]
    assert inner_int.value == [1, -(2**31), 3]


def test_unserialize_pairlist_and_specials():
    blob = header(2) + pairlist([(symbol("a"), intsxp([7])), (symbol("b"), i32(254))])
    obj = unserialize(blob)
    assert obj.rtype == "pairlist"
    assert obj.to_dict() == {"a": RObject("integer", [7]), "b": None}
    assert unserialize(header() + i32(254)) is None
    long = unserialize(header() + pairlist([(symbol(f"s{i}"), intsxp([i])) for i in range(3000)]))
    assert len(long.value) == 3000 and long.value[-1] == ("s2999", RObject("integer", [2999]))  # no recursion
    assert unserialize(header() + i32(1) + charsxp("sym")) == RSymbol("sym")


def test_unserialize_compact_intseq_altrep():
    # ALTREP info is an untagged pairlist (class symbol, package symbol, base type)
    info = b"".join(i32(2) + v for v in (symbol("compact_intseq"), symbol("base"), intsxp([13]))) + i32(254)
    state = i32(14, 3) + struct.pack(">3d", 4.0, 10.0, 1.0)
    obj = unserialize(header() + i32(238) + info + state + i32(254))
    assert obj == RObject("integer", [10, 11, 12, 13])


def test_unserialize_rejects_other_formats():
    with pytest.raises(ValueError, match="only XDR"):
        unserialize(b"A\n2\n")
    with pytest.raises(ValueError, match="unsupported R SEXP type 21"):
        unserialize(header() + i32(21))


@pytest.mark.parametrize(("kind", "pack"), [(b"Z", lzma.compress), (b"2", bz2.compress), (b"0", bytes)])
def test_decompress_chunk_type_bytes(kind, pack):
    blob = header() + strsxp(["x"])
    chunk = struct.pack(">I", len(blob)) + kind + pack(blob)
    assert decompress_chunk(chunk, compressed=3) == blob
    assert decompress_chunk(struct.pack(">I", len(blob)) + zlib.compress(blob)) == blob
    with pytest.raises(ValueError, match="header says"):
        decompress_chunk(struct.pack(">I", 1) + zlib.compress(blob))


def test_read_lazyload_db():
    rdx, rdb = lazyload_db({"emma": header() + strsxp(["a", "b"]), "n": header() + intsxp([5])})
    objects = read_lazyload_db(rdx, rdb)
    assert objects["emma"].value == ["a", "b"]
    assert objects["n"].value == [5]


# ------------------------------------------------------------------------------------------- .deb / Austen


def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar_bytes(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        head = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += head + data + (b"\n" if len(data) % 2 else b"")
    return out


def novel_lines(title: str) -> list[str]:
    return [
        title.upper(),
        "",
        "VOLUME I",
        "",
        "CHAPTER I",
        "",
        f"The first line of {title},",
        "wrapped here.",
        "",
        "Second paragraph.",
        "",
        "Chapter 2",
        "",
        "The end of it.",
    ]


@pytest.fixture
def tiny_deb(tmp_path):
    rdx, rdb = lazyload_db({name: header() + strsxp(novel_lines(title)) for name, title in AUSTEN_NOVELS.items()})
    prefix = "./usr/lib/R/site-library/janeaustenr/data/"
    data = tar_bytes({prefix + "Rdata.rdx": rdx, prefix + "Rdata.rdb": rdb}, "w:xz")
    path = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    path.write_bytes(
        ar_bytes({"debian-binary": b"2.0\n", "control.tar.xz": tar_bytes({}, "w:xz"), "data.tar.xz": data})
    )
    return path


def test_austen_documents_from_tiny_deb(tiny_deb):
    docs = austen_documents(deb=tiny_deb)
    assert [d.doc_id for d in docs] == [f"austen/{n}" for n in AUSTEN_NOVELS]
    emma = docs[3]
    assert emma.title == "Emma"
    assert "The first line of Emma, wrapped here.\n\nSecond paragraph." in emma.text
    chapters = austen_chapters(emma)
    assert [c.doc_id for c in chapters] == ["austen/emma/ch01", "austen/emma/ch02"]
    assert chapters[0].text == "The first line of Emma, wrapped here.\n\nSecond paragraph."
    assert chapters[1].text == "The end of it."


def test_fetch_janeaustenr_uses_cache_and_reports_command(tmp_path, tiny_deb, monkeypatch):
    assert fetch_janeaustenr(tiny_deb.parent) == tiny_deb  # present: no download
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # apt-get cannot start
    with pytest.raises(RuntimeError, match="`apt-get download r-cran-janeaustenr`"):
        fetch_janeaustenr(tmp_path / "empty")


def test_fetch_bigbench_reports_command(tmp_path, monkeypatch):
    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(downloads.subprocess, "run", fail)
    with pytest.raises(
        RuntimeError,
        match=r"(?s)pip download --no-deps --only-binary :all: pip==26\.2\.1 .*no network.*"
        r"pip download --disable-pip-version-check --no-deps --no-binary :all: bigbench==1\.0\.0 ",
    ):
        fetch_bigbench(tmp_path)


def test_raw_dir_follows_polykv_home(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYKV_HOME", str(tmp_path))
    assert raw_dir() == tmp_path / "raw"


# ----------------------------------------------------------------------------------------------- BIG-bench


@pytest.fixture
def tiny_sdist(tmp_path):
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    passage = "Ann Lee met Bob Stone in Rome. Later Ann moved to Paris."
    quoref = {
        "examples": [
            {"input": f"Passage: {passage}\nQuestion: Who met Bob?", "target": ["Ann Lee."]},
            {"input": f"Passage: {passage}\nQuestion: Where did Ann move?", "target": ["Paris."]},
            {
                "input": f"Passage: {passage}\nQuestion: Who met?",
                "target": ["Ann.", "Bob."],
            },  # multi-span: dropped
            {
                "input": "Passage: Other text.\nQuestion: What?",
                "target": ["absent."],
            },  # not in passage: dropped
        ]
    }
    xsum = {
        "examples": [
            {"input": "Article one body.", "target": "A summary sentence of six words."},
            {"input": "Article two body.", "target": "A chronology of key events:"},  # heading: dropped
        ]
    }
    snips = {
        "examples": [{"input": "Utterance: Play some jazz.", "target_scores": {"play_music": 1, "get_weather": 0}}]
    }
    files = {
        root + t + "/task.json": json.dumps(d).encode()
        for t, d in [
            ("natural_instructions/subtask002_quoref_answer_generation", quoref),
            ("gem/xsum", xsum),
            ("gem/wikilingua_en", xsum),
            ("intent_recognition", snips),
        ]
    }
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    path.write_bytes(tar_bytes(files, "w:gz"))
    return path


def test_bigbench_documents_from_tiny_sdist(tiny_sdist):
    docs = bigbench_documents(sdist=tiny_sdist)
    (quoref,) = docs["quoref"]
    assert [(qa.question, qa.answers) for qa in quoref.qa] == [
        ("Who met Bob?", ("Ann Lee",)),
        ("Where did Ann move?", ("Paris",)),
    ]
    assert all(a in quoref.text for qa in quoref.qa for a in qa.answers)
    assert [d.summary for d in docs["xsum"]] == ["A summary sentence of six words."]
    (snips,) = docs["snips"]
    assert (snips.text, snips.label, snips.meta["classes"]) == (
        "Play some jazz.",
        "play_music",
        "play_music,get_weather",
    )


# ----------------------------------------------------------------------------------------------- Python code


def test_python_documents_filters_and_orders(tmp_path):
    (tmp_path / "b.py").write_text("x = 1\n" * 30)
    (tmp_path / "a.py").write_text("y = 2\n" * 30)
    (tmp_path / "short.py").write_text("z = 3\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("w = 1\n" * 30)
    docs = python_documents(tmp_path, min_lines=20)
    assert [d.doc_id for d in docs] == ["python/a.py", "python/b.py"]
    assert python_documents(tmp_path, min_lines=20, max_files=1)[0].title == "a.py"


# ----------------------------------------------------------------------------------------------- synthetic


def test_generators_deterministic_and_answers_in_text():
    for make in (make_passkey, make_multi_key_needle, make_kv_lookup, make_variable_tracking):
        a, b = make(random.Random(3), 12), make(random.Random(3), 12)
        assert a == b
        text, qa = a
        assert all(ans in text for ans in qa.answers)
    text, qa = make_kv_lookup(random.Random(1), 5)
    key = qa.question.split('Key: "')[1].rstrip('"')
    assert json.loads(text)[key] == qa.answers[0]


def test_variable_tracking_chain_resolves_to_the_value():
    text, qa = make_variable_tracking(random.Random(7), 15, hops=5, chains=3)
    value = qa.question.split("value ")[1].split(" ")[0]
    env = {}
    for name, ref, number in re.findall(r"VAR (\w+) = (?:VAR (\w+)|(\d+))\.", text):
        env[name] = env[ref] if ref else number  # assignments appear in chain order
    assert sorted(n for n, v in env.items() if v == value) == sorted(qa.answers)
    assert len(qa.answers) == 5


def test_sized_synthetic_and_documents_hit_lengths():
    for kind in ("passkey", "multi_key_needle", "kv_lookup", "variable_tracking"):
        text, qa, n = sized_synthetic(kind, "s", approx_tokens, 1500)
        assert n == approx_tokens(text) and abs(n - 1500) <= 0.05 * 1500
    docs = synthetic_documents(6, seed=1, tokens=(600, 900))
    assert docs == synthetic_documents(6, seed=1, tokens=(600, 900))
    assert [d.meta["kind"] for d in docs[:3]] == ["passkey", "multi_key_needle", "kv_lookup"]
    assert all(600 <= approx_tokens(d.text) <= 900 for d in docs)
    with pytest.raises(ValueError, match="unknown synthetic kinds"):
        synthetic_documents(1, kinds=("nope",))


# ------------------------------------------------------------------------------------------- real downloads


def cached(pattern: str):
    found = sorted(raw_dir().glob(pattern))
    if not found:
        pytest.skip(f"no cached {pattern} in {raw_dir()} (run `polykv_learn.data.prepare` once to download)")
    return found[-1]


def test_real_austen_novels_if_cached():
    docs = austen_documents(deb=cached("r-cran-janeaustenr_*.deb"))
    pride = docs[1]
    assert "It is a truth universally acknowledged, that a single man in possession" in pride.text
    assert [len(austen_chapters(d)) for d in docs] == [50, 61, 48, 55, 31, 24]


def test_real_bigbench_if_cached():
    docs = bigbench_documents(sdist=cached("bigbench-1.0.0.tar.gz"))
    assert len(docs["quoref"]) > 2000 and len(docs["xsum"]) > 900 and len(docs["snips"]) > 600
    assert all(a in d.text for d in docs["quoref"][:200] for qa in d.qa for a in qa.answers)
