"""Downloads of the offline raw sources, by package name through the package clients (pip, apt-get).

- ``fetch_bigbench``: the BIG-bench sdist (``bigbench==1.0.0``), downloaded with pip, never built or installed.
  pip 26.3 refuses every distribution from PyPI whose metadata declares a direct URL dependency, under
  ``pip download --no-deps`` too, and has no flag that skips that check (nor a download path that skips preparing
  an sdist's metadata); BIG-bench's ``setup.py`` declares ``bleurt @ file://...`` (a zip inside the sdist). So the
  sdist is fetched by pip ``SDIST_PIP_VERSION`` (the newest release without the check), run straight from its
  wheel: the environment's own pip only downloads that wheel and is never changed.
- ``fetch_janeaustenr``: the Debian package ``r-cran-janeaustenr`` (``apt-get download``).

Everything lands in ``raw_dir()`` (``$POLYKV_HOME/raw``) and is reused. A failed download raises
``RuntimeError`` with the exact commands to run by hand.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "BIGBENCH_VERSION",
    "SDIST_PIP_VERSION",
    "bigbench_fetch_commands",
    "fetch_bigbench",
    "fetch_janeaustenr",
    "janeaustenr_fetch_command",
    "raw_dir",
]

BIGBENCH_VERSION = "1.0.0"
SDIST_PIP_VERSION = "26.2.1"
"""The pip release that downloads the BIG-bench sdist (see the module docstring for why not the installed one)."""


def raw_dir() -> Path:
    """The download cache: ``$POLYKV_HOME/raw``, default ``~/.cache/polykv-learn/raw``."""
    home = os.environ.get("POLYKV_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "polykv-learn"
    return base / "raw"


def _sdist_pip_wheel(cache: Path) -> Path:
    """Where ``fetch_bigbench`` keeps the wheel of pip ``SDIST_PIP_VERSION``."""
    return cache / "pip" / f"pip-{SDIST_PIP_VERSION}-py3-none-any.whl"


def bigbench_fetch_commands(cache: Path) -> list[list[str]]:
    """The two commands that fetch the BIG-bench sdist into ``cache``: the installed pip downloads the wheel of
    pip ``SDIST_PIP_VERSION`` (skipped when it is cached), which then downloads the sdist."""
    wheel = _sdist_pip_wheel(cache)
    get_pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    get_pip += [f"pip=={SDIST_PIP_VERSION}", "-d", str(wheel.parent)]
    get_sdist = [sys.executable, str(wheel / "pip"), "download", "--disable-pip-version-check"]
    get_sdist += ["--no-deps", "--no-binary", ":all:", f"bigbench=={BIGBENCH_VERSION}", "-d", str(cache)]
    return [get_pip, get_sdist]


def janeaustenr_fetch_command() -> list[str]:
    """The command that fetches the ``r-cran-janeaustenr`` .deb (into the folder it runs in)."""
    return ["apt-get", "download", "r-cran-janeaustenr"]


def _run_download(cmds: Sequence[Sequence[str]], cwd: Path, what: str) -> None:
    """Run download commands in order in ``cwd``; if one fails, raise ``RuntimeError`` naming it, its output, and
    the exact commands (that one and those after it) to run by hand."""
    cwd.mkdir(parents=True, exist_ok=True)
    for i, cmd in enumerate(cmds):
        shown = shlex.join(cmd)
        todo = " && ".join(shlex.join(c) for c in cmds[i:])
        advice = f"Run `{todo}` yourself (in {cwd}) or place the file there by hand."
        try:
            proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
        except OSError as err:
            failure = f"could not start: {err}"
            raise RuntimeError(f"cannot download {what}: `{shown}` (in {cwd}) {failure}\n{advice}") from err
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            failure = f"exited with {proc.returncode}:\n{tail}"
            raise RuntimeError(f"cannot download {what}: `{shown}` (in {cwd}) {failure}\n{advice}")


def fetch_bigbench(cache_dir: Path | None = None) -> Path:
    """Path of the BIG-bench sdist, downloading it (no build, no install) with ``bigbench_fetch_commands`` if
    missing."""
    cache = Path(cache_dir) if cache_dir is not None else raw_dir()
    path = cache / f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    if not path.is_file():
        cmds = bigbench_fetch_commands(cache)
        if _sdist_pip_wheel(cache).is_file():
            cmds = cmds[1:]
        _run_download(cmds, cache, "the BIG-bench sdist")
        if not path.is_file():
            raise RuntimeError(f"`{shlex.join(cmds[-1])}` succeeded but {path} is missing")
    return path


def fetch_janeaustenr(cache_dir: Path | None = None) -> Path:
    """Path of the ``r-cran-janeaustenr`` .deb, downloading it with ``apt-get download`` if missing."""
    cache = Path(cache_dir) if cache_dir is not None else raw_dir()
    found = sorted(cache.glob("r-cran-janeaustenr_*.deb"))
    if not found:
        cmd = janeaustenr_fetch_command()
        what = "the Jane Austen novels (Debian package r-cran-janeaustenr; if apt cannot find it, run `apt-get update`)"
        _run_download([cmd], cache, what)
        found = sorted(cache.glob("r-cran-janeaustenr_*.deb"))
        if not found:
            raise RuntimeError(f"`{shlex.join(cmd)}` succeeded but no r-cran-janeaustenr_*.deb is in {cache}")
    return found[-1]
