"""The download commands of the raw sources (no network: ``subprocess.run`` is replaced by a recorder)."""

import shlex
import subprocess
import sys

import pytest

from polykv_learn.data import downloads
from polykv_learn.data.downloads import (
    SDIST_PIP_VERSION,
    bigbench_fetch_commands,
    fetch_bigbench,
    fetch_janeaustenr,
    janeaustenr_fetch_command,
)


class Recorder:
    """Stands in for ``subprocess.run``: records ``(cmd, cwd)``, then creates ``creates[i]`` and returns
    ``codes[i]`` for the i-th call."""

    def __init__(self, creates=(), codes=(), stderr=""):
        self.calls, self.creates, self.codes, self.stderr = [], list(creates), list(codes), stderr

    def __call__(self, cmd, cwd=None, **kw):
        i = len(self.calls)
        self.calls.append((list(cmd), cwd))
        if i < len(self.creates) and self.creates[i] is not None:
            self.creates[i].parent.mkdir(parents=True, exist_ok=True)
            self.creates[i].write_bytes(b"x")
        code = self.codes[i] if i < len(self.codes) else 0
        return subprocess.CompletedProcess(cmd, code, "", self.stderr if code else "")


def test_bigbench_fetch_commands_are_the_pinned_pip_from_its_wheel(tmp_path):
    wheel = tmp_path / "pip" / "pip-26.2.1-py3-none-any.whl"
    assert SDIST_PIP_VERSION == "26.2.1"
    assert bigbench_fetch_commands(tmp_path) == [
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "pip==26.2.1"]
        + ["-d", str(tmp_path / "pip")],
        [sys.executable, str(wheel / "pip"), "download", "--disable-pip-version-check", "--no-deps"]
        + ["--no-binary", ":all:", "bigbench==1.0.0", "-d", str(tmp_path)],
    ]


def test_fetch_bigbench_downloads_pip_wheel_then_sdist_and_reuses_both(tmp_path, monkeypatch):
    get_pip, get_sdist = bigbench_fetch_commands(tmp_path)
    wheel, sdist = tmp_path / "pip" / "pip-26.2.1-py3-none-any.whl", tmp_path / "bigbench-1.0.0.tar.gz"
    rec = Recorder(creates=[wheel, sdist])
    monkeypatch.setattr(downloads.subprocess, "run", rec)
    assert fetch_bigbench(tmp_path) == sdist
    assert rec.calls == [(get_pip, tmp_path), (get_sdist, tmp_path)]
    assert fetch_bigbench(tmp_path) == sdist  # cached: nothing runs
    assert len(rec.calls) == 2
    sdist.unlink()
    rec = Recorder(creates=[sdist])
    monkeypatch.setattr(downloads.subprocess, "run", rec)
    assert fetch_bigbench(tmp_path) == sdist
    assert rec.calls == [(get_sdist, tmp_path)]  # the cached pip wheel is reused


def test_fetch_bigbench_failure_names_the_commands_left_to_run(tmp_path, monkeypatch):
    get_pip, get_sdist = bigbench_fetch_commands(tmp_path)
    monkeypatch.setattr(downloads.subprocess, "run", Recorder(codes=[1], stderr="ERROR: no network"))
    with pytest.raises(RuntimeError) as err:
        fetch_bigbench(tmp_path)
    assert str(err.value) == (
        f"cannot download the BIG-bench sdist: `{shlex.join(get_pip)}` (in {tmp_path}) exited with 1:\n"
        "ERROR: no network\n"
        f"Run `{shlex.join(get_pip)} && {shlex.join(get_sdist)}` yourself (in {tmp_path}) or place the file there by"
        " hand."
    )
    wheel = tmp_path / "pip" / "pip-26.2.1-py3-none-any.whl"
    monkeypatch.setattr(downloads.subprocess, "run", Recorder(creates=[wheel], codes=[0, 2], stderr="ERROR: x"))
    with pytest.raises(RuntimeError) as err:
        fetch_bigbench(tmp_path)
    assert str(err.value) == (
        f"cannot download the BIG-bench sdist: `{shlex.join(get_sdist)}` (in {tmp_path}) exited with 2:\n"
        f"ERROR: x\nRun `{shlex.join(get_sdist)}` yourself (in {tmp_path}) or place the file there by hand."
    )


def test_fetch_bigbench_success_without_the_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads.subprocess, "run", Recorder())
    (tmp_path / "pip").mkdir()
    (tmp_path / "pip" / "pip-26.2.1-py3-none-any.whl").write_bytes(b"x")
    get_sdist = bigbench_fetch_commands(tmp_path)[1]
    with pytest.raises(RuntimeError) as err:
        fetch_bigbench(tmp_path)
    assert str(err.value) == f"`{shlex.join(get_sdist)}` succeeded but {tmp_path / 'bigbench-1.0.0.tar.gz'} is missing"


def test_fetch_janeaustenr_command_and_failure_message(tmp_path, monkeypatch):
    assert janeaustenr_fetch_command() == ["apt-get", "download", "r-cran-janeaustenr"]
    deb = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    rec = Recorder(creates=[deb])
    monkeypatch.setattr(downloads.subprocess, "run", rec)
    assert fetch_janeaustenr(tmp_path) == deb
    assert rec.calls == [(["apt-get", "download", "r-cran-janeaustenr"], tmp_path)]
    empty = tmp_path / "empty"
    monkeypatch.setattr(downloads.subprocess, "run", Recorder(codes=[100], stderr="E: Unable to locate package"))
    with pytest.raises(RuntimeError) as err:
        fetch_janeaustenr(empty)
    assert str(err.value).endswith(
        f"`apt-get download r-cran-janeaustenr` (in {empty}) exited with 100:\nE: Unable to locate package\n"
        f"Run `apt-get download r-cran-janeaustenr` yourself (in {empty}) or place the file there by hand."
    )
