"""``atomic``: files and folders appear whole or not at all, with the umask's permissions."""

import os

import pytest

from polykv_learn import atomic


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_text_replaces_whole_and_leaves_no_temp(tmp_path, umask_022):
    path = tmp_path / "sub" / "out.txt"
    atomic.atomic_write_text(path, "old")
    atomic.atomic_write_text(path, ["n", "ew"])
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["out.txt"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic.atomic_write_text(path, "old")

    def chunks():
        yield "half"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_text(path, chunks())
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_dir_swaps_a_whole_folder(tmp_path, umask_022):
    target = tmp_path / "art"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["a", "b"] and (target / "a").read_text() == "2"
    assert os.listdir(tmp_path) == ["art"]
    assert target.stat().st_mode & 0o777 == 0o755
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("3")
        raise RuntimeError("crash while writing")
    assert (target / "a").read_text() == "2" and os.listdir(tmp_path) == ["art"]


def test_without_the_exchange_a_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    target = tmp_path / "art"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's rename onto the target
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"), atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not target.exists()  # the old folder was moved aside
    assert atomic.recover_dir(target)
    assert (target / "a").read_text() == "old"
    assert os.listdir(tmp_path) == ["art"]


def test_remove_stale_spares_young_temps_and_other_files(tmp_path):
    old = tmp_path / ".x.txt.tmp-abc"
    old.write_text("")
    os.utime(old, (1, 1))
    young = tmp_path / ".y.txt.tmp-def"
    young.write_text("")
    keep = tmp_path / "x.txt"
    keep.write_text("")
    assert atomic.remove_stale(tmp_path, older_than_s=60) == [old]
    assert sorted(os.listdir(tmp_path)) == [".y.txt.tmp-def", "x.txt"]
