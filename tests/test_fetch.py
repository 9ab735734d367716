"""vendor/fetch.py: the pinned upstream, unpacked and patched, idempotently and loudly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

FETCH = ROOT / "vendor" / "fetch.py"

NEW_FILE_PATCH = """\
Description: add a file (test)
Forwarded: not-needed
Last-Update: 2026-01-01

diff --git a/LLAMA_SPARSE_TEST b/LLAMA_SPARSE_TEST
new file mode 100644
--- /dev/null
+++ b/LLAMA_SPARSE_TEST
@@ -0,0 +1 @@
+first
"""

EDIT_FILE_PATCH = """\
Description: edit that file (test)
Forwarded: not-needed
Last-Update: 2026-01-01

diff --git a/LLAMA_SPARSE_TEST b/LLAMA_SPARSE_TEST
--- a/LLAMA_SPARSE_TEST
+++ b/LLAMA_SPARSE_TEST
@@ -1 +1 @@
-first
+second
"""

BROKEN_PATCH = """\
Description: does not apply (test)

diff --git a/src/llama.cpp b/src/llama.cpp
--- a/src/llama.cpp
+++ b/src/llama.cpp
@@ -1,3 +1,3 @@
-this line is not in upstream
+neither is this one
"""


def fetch(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FETCH), *map(str, args)], capture_output=True, text=True, timeout=600
    )


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def series(tmp_path: Path, **patches: str) -> Path:
    d = tmp_path / "patches"
    d.mkdir(exist_ok=True)
    for name, text in patches.items():
        (d / f"{name}.patch").write_text(text)
    return d


def test_pristine_tree_then_noop(tmp_path: Path) -> None:
    dest = tmp_path / "llama.cpp"
    proc = fetch("--dest", dest, "--no-patches")
    assert proc.returncode == 0, proc.stderr
    assert (dest / "ggml" / "include" / "ggml.h").is_file()
    assert not (dest / ".git").is_file()  # the sdist's submodule link is not unpacked
    head = git(dest, "rev-parse", "HEAD")
    assert git(dest, "rev-parse", "upstream") == head

    start = time.monotonic()
    again = fetch("--dest", dest, "--no-patches")
    assert again.returncode == 0 and again.stderr == ""
    assert time.monotonic() - start < 5
    assert git(dest, "rev-parse", "HEAD") == head


def test_series_applied_in_order_as_commits(tmp_path: Path) -> None:
    patches = series(tmp_path, **{"0001-add": NEW_FILE_PATCH, "0002-edit": EDIT_FILE_PATCH})
    dest = tmp_path / "llama.cpp"
    proc = fetch("--dest", dest, "--patches", patches)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "LLAMA_SPARSE_TEST").read_text() == "second\n"
    log = git(dest, "log", "--format=%s", "upstream..HEAD").splitlines()
    assert log == ["0002-edit.patch", "0001-add.patch"]


def test_broken_patch_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    patches = series(tmp_path, **{"0001-add": NEW_FILE_PATCH, "0002-broken": BROKEN_PATCH})
    dest = tmp_path / "llama.cpp"
    proc = fetch("--dest", dest, "--patches", patches)
    assert proc.returncode == 1
    assert "patch 0002-broken.patch does not apply" in proc.stderr
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".llama.cpp.tmp")] == []


def test_local_work_is_never_wiped(tmp_path: Path) -> None:
    dest = tmp_path / "llama.cpp"
    assert fetch("--dest", dest, "--no-patches").returncode == 0
    (dest / "README.md").write_text("my unsaved work\n")
    patches = series(tmp_path, **{"0001-add": NEW_FILE_PATCH})
    proc = fetch("--dest", dest, "--patches", patches)
    assert proc.returncode == 1 and "uncommitted changes" in proc.stderr
    assert (dest / "README.md").read_text() == "my unsaved work\n"


def test_refresh_writes_commits_back_as_patches(tmp_path: Path) -> None:
    patches = series(tmp_path, **{"0001-add": NEW_FILE_PATCH})
    dest = tmp_path / "llama.cpp"
    assert fetch("--dest", dest, "--patches", patches).returncode == 0
    # edit the patch's commit the way docs/ARCHITECTURE.md says
    (dest / "LLAMA_SPARSE_TEST").write_text("changed\n")
    git(dest, "commit", "-q", "-a", "--amend", "--no-edit")
    assert fetch("--dest", dest, "--patches", patches, "--refresh").returncode == 0
    text = (patches / "0001-add.patch").read_text()
    assert text.startswith("Description: add a file (test)\nForwarded: not-needed\n")
    assert "Last-Update: 2026-01-01" not in text  # refreshed patches get today's date
    assert "+changed" in text and "+first" not in text
    # the edited tree now is the series: fetching it again changes nothing
    head = git(dest, "rev-parse", "HEAD")
    same = fetch("--dest", dest, "--patches", patches)
    assert same.returncode == 0 and same.stderr == ""
    assert git(dest, "rev-parse", "HEAD") == head
    # the refreshed series applies to a clean upstream
    again = fetch("--dest", tmp_path / "other", "--patches", patches)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "other" / "LLAMA_SPARSE_TEST").read_text() == "changed\n"
