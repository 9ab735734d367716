#!/usr/bin/env python3
"""Fetch, verify, unpack and patch the pinned upstream llama.cpp.

    python vendor/fetch.py                  # vendor/llama.cpp, patched (the build runs this)
    python vendor/fetch.py --dest DIR --no-patches
                                            # a pristine copy (the parity reference build)
    python vendor/fetch.py --sdist          # print the cached source distribution's path
    python vendor/fetch.py --refresh        # vendor/patches/ from vendor/llama.cpp commits

The source distribution named in vendor/upstream.lock is downloaded once with
pip (so whatever index pip is configured for is used), checked against its
sha256 and kept in the cache ($LLAMA_SPARSE_CACHE, else
$XDG_CACHE_HOME/llama-sparse, else ~/.cache/llama-sparse).  Its llama.cpp tree
is unpacked into a git repository whose first commit is tagged `upstream`;
each patch of vendor/patches/ is then applied with `git apply` and committed
under its file name, so `git log upstream..` is the patch series and
`--refresh` turns edited commits back into patch files.

Running it again is cheap: a stamp records the sdist hash and the patches'
hashes, and nothing is redone while they match.  A tree holding work that
is not in vendor/patches (uncommitted edits, extra commits) is never wiped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

VENDOR = Path(__file__).resolve().parent
LOCK = VENDOR / "upstream.lock"
PATCHES = VENDOR / "patches"
STAMP = "llama-sparse-stamp.json"  # kept inside .git/, so it never dirties the tree
GIT = [
    "git",
    "-c",
    "user.name=llama-sparse",
    "-c",
    "user.email=llama-sparse@localhost",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "core.autocrlf=false",
    "-c",
    "init.defaultBranch=main",
]


class FetchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"fetch: {msg}", file=sys.stderr, flush=True)


def read_lock() -> dict[str, str]:
    with LOCK.open("rb") as f:
        return tomllib.load(f)["upstream"]


def cache_dir() -> Path:
    env = os.environ.get("LLAMA_SPARSE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llama-sparse"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise concurrent fetches (a build and a test, two builds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_sdist(lock: dict[str, str]) -> Path:
    """Return the cached, verified source distribution, downloading it if needed."""
    name = lock["package"].replace("-", "_")
    store = cache_dir() / "upstream"
    target = store / f"{name}-{lock['version']}.tar.gz"
    with locked(store / ".lock"):
        if target.exists():
            if sha256_file(target) == lock["sha256"]:
                return target
            log(f"cached {target.name} does not match the lock's sha256; downloading again")
            target.unlink()
        with tempfile.TemporaryDirectory(dir=store) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                f"{lock['package']}=={lock['version']}",
            ]
            if importlib.util.find_spec("scikit_build_core") is not None:
                cmd.append("--no-build-isolation")  # its metadata needs nothing more
            log(f"downloading {lock['package']} {lock['version']} (sdist) with pip")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            files = list(Path(tmp).glob("*.tar.gz"))
            if proc.returncode != 0 or len(files) != 1:
                raise FetchError(
                    f"pip could not download {lock['package']}=={lock['version']}:\n"
                    + proc.stdout[-3000:]
                )
            got = sha256_file(files[0])
            if got != lock["sha256"]:
                raise FetchError(
                    f"{files[0].name}: sha256 {got} does not match vendor/upstream.lock "
                    f"({lock['sha256']}); refusing to use it"
                )
            os.replace(files[0], target)
    return target


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(GIT + list(args), cwd=cwd, text=True, capture_output=True)
    if check and proc.returncode != 0:
        raise FetchError(f"git {' '.join(args)} failed in {cwd}:\n{proc.stderr.strip()}")
    return proc


def patch_series(patch_dir: Path | None) -> list[Path]:
    return sorted(patch_dir.glob("*.patch")) if patch_dir else []


def wanted_stamp(lock: dict[str, str], patches: list[Path]) -> dict[str, object]:
    return {"sdist_sha256": lock["sha256"], "patches": [[p.name, sha256_file(p)] for p in patches]}


def read_stamp(dest: Path) -> dict[str, object] | None:
    try:
        return json.loads((dest / ".git" / STAMP).read_text())
    except (OSError, ValueError):
        return None


def check_disposable(dest: Path, stamp: dict[str, object] | None) -> None:
    """Refuse to wipe a tree that holds work not saved in vendor/patches."""
    if not dest.exists():
        return
    if stamp is None:
        if any(dest.iterdir()):
            raise FetchError(
                f"{dest} exists but was not made by vendor/fetch.py; move it away or delete it"
            )
        return
    if git(dest, "status", "--porcelain").stdout.strip():
        raise FetchError(
            f"{dest} has uncommitted changes; commit them and run "
            "`python vendor/fetch.py --refresh`, or discard them"
        )
    if git(dest, "rev-parse", "HEAD").stdout.strip() != stamp.get("head"):
        raise FetchError(
            f"{dest} has commits that are not in vendor/patches; run "
            "`python vendor/fetch.py --refresh` first, or delete the tree"
        )


def unpack(sdist: Path, dest: Path) -> None:
    """Extract only the llama.cpp tree of the sdist into dest."""
    marker = "/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            head, sep, rest = m.name.partition(marker)
            # the sdist keeps the submodule's `.git` file; it points nowhere here
            if sep and "/" not in head and rest and rest.split("/")[0] != ".git":
                m.name = rest
                members.append(m)
        if not members:
            raise FetchError(f"{sdist.name} has no vendor/llama.cpp tree")
        tar.extractall(dest, members=members, filter="data")


def prepare(dest: Path, patch_dir: Path | None) -> None:
    lock = read_lock()
    patches = patch_series(patch_dir)
    want = wanted_stamp(lock, patches)
    with locked(dest.parent / f".{dest.name}.lock"):
        stamp = read_stamp(dest)
        if stamp is not None and {k: stamp.get(k) for k in want} == want:
            return
        check_disposable(dest, stamp)
        sdist = ensure_sdist(lock)
        tmp = dest.parent / f".{dest.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log(f"unpacking llama.cpp {lock['llama_cpp_commit']} from {sdist.name}")
        unpack(sdist, tmp)
        git(tmp, "init", "-q")
        git(tmp, "add", "-A", "-f")
        git(
            tmp,
            "commit",
            "-q",
            "-m",
            f"llama.cpp {lock['llama_cpp_commit']} from {lock['package']} {lock['version']}",
        )
        git(tmp, "tag", "upstream")
        for p in patches:
            proc = git(tmp, "apply", "--check", str(p), check=False)
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise FetchError(
                    f"patch {p.name} does not apply to llama.cpp "
                    f"{lock['llama_cpp_commit']}:\n{proc.stderr.strip()}\n"
                    "refresh it against the new upstream (docs/ARCHITECTURE.md)"
                )
            git(tmp, "apply", "--whitespace=nowarn", str(p))
            git(tmp, "add", "-A", "-f")
            git(tmp, "commit", "-q", "--allow-empty", "-m", p.name)
            log(f"applied {p.name}")
        want["head"] = git(tmp, "rev-parse", "HEAD").stdout.strip()
        (tmp / ".git" / STAMP).write_text(json.dumps(want, indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        log(f"{dest} ready ({len(patches)} patches)")


def refresh(dest: Path, patch_dir: Path) -> None:
    """Write each commit after `upstream` back to its patch file, keeping the header."""
    commits = git(dest, "rev-list", "--reverse", "upstream..HEAD").stdout.split()
    today = datetime.date.today().isoformat()
    for c in commits:
        subject, _, body = git(dest, "log", "-1", "--format=%B", c).stdout.partition("\n")
        name = subject.strip()
        if not name.endswith(".patch"):
            raise FetchError(
                f"commit {c[:10]}: its subject must be the patch file name "
                f"(NNNN-what.patch), not {name!r}"
            )
        diff = git(dest, "diff", "--no-color", "--no-ext-diff", f"{c}~1", c).stdout
        path = patch_dir / name
        header = body.strip() + "\n"
        if path.exists():
            old = path.read_text()
            header = old[: old.find("diff --git")] if "diff --git" in old else old
            if old == header + diff:
                continue
        header = (
            "\n".join(
                f"Last-Update: {today}" if line.startswith("Last-Update:") else line
                for line in header.splitlines()
            )
            + "\n"
        )
        if "Description:" not in header:
            raise FetchError(
                f"{name}: give the commit message a DEP-3 header "
                "(Description, Forwarded, Last-Update)"
            )
        path.write_text(header.rstrip("\n") + "\n\n" + diff)
        log(f"wrote {path}")
    names = {git(dest, "log", "-1", "--format=%s", c).stdout.strip() for c in commits}
    stale = sorted(p.name for p in patch_series(patch_dir) if p.name not in names)
    if stale:
        raise FetchError(f"{', '.join(stale)}: no commit in {dest} carries these patches; "
                         "delete them or commit them again")  # fmt: skip
    # the tree is now exactly upstream + the series: the next fetch has nothing to do
    stamp = wanted_stamp(read_lock(), patch_series(patch_dir))
    stamp["head"] = git(dest, "rev-parse", "HEAD").stdout.strip()
    (dest / ".git" / STAMP).write_text(json.dumps(stamp, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--dest",
        type=Path,
        default=VENDOR / "llama.cpp",
        help="where to put the tree (default: vendor/llama.cpp)",
    )
    ap.add_argument(
        "--patches",
        type=Path,
        default=PATCHES,
        help="patch series to apply (default: vendor/patches)",
    )
    ap.add_argument("--no-patches", action="store_true", help="leave upstream unpatched")
    ap.add_argument(
        "--sdist", action="store_true", help="only fetch the source distribution and print its path"
    )
    ap.add_argument(
        "--refresh", action="store_true", help="rewrite the patch files from the commits in --dest"
    )
    args = ap.parse_args(argv)
    try:
        if args.sdist:
            print(ensure_sdist(read_lock()))
        elif args.refresh:
            refresh(args.dest.resolve(), args.patches)
        else:
            prepare(args.dest.resolve(), None if args.no_patches else args.patches)
    except FetchError as e:
        print(f"fetch: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
