#!/usr/bin/env python3
"""Build unpatched upstream llama.cpp: the reference that parity is measured against.

    python vendor/reference.py [--targets T ...]   # prints the directory of its libs and tools

The reference is the same upstream source distribution, without
vendor/patches and without ggml_sparse/, configured by our own CMakeLists.txt
(LLAMA_SPARSE_UPSTREAM_DIR) so it gets exactly the options our build gets:
any difference between the two can only come from our changes.

It lives in build/reference/ with the same relative layout as the package
build (build/reference/vendor/llama.cpp, build/reference/build/<tag>), and
ccache is told that the repository is the base directory; so every object
whose source we did not patch is a cache hit and the reference costs little
more than linking.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fetch

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "build" / "reference"
DEFAULT_TARGETS = ["llama", "llama-bench", "llama-completion"]


def package_compilers() -> list[str]:
    """The compilers the package build (build/<wheel tag>/) used: the same binaries, by the
    same names (ccache keys on the name)."""
    flags = []
    for cache in ROOT.glob("build/*/CMakeCache.txt"):
        for line in cache.read_text().splitlines():
            for lang in ("C", "CXX"):
                if line.startswith(f"CMAKE_{lang}_COMPILER:FILEPATH="):
                    flags.append(f"-DCMAKE_{lang}_COMPILER={line.split('=', 1)[1]}")
        break
    return flags


def build(targets: list[str]) -> Path:
    src = REFERENCE / "vendor" / "llama.cpp"
    fetch.prepare(src, None)
    # same depth as the package build (build/{wheel_tag}), so relative paths match
    build_dir = REFERENCE / "build" / "cpu"
    env = dict(os.environ, CCACHE_BASEDIR=str(ROOT))
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (build_dir / "CMakeCache.txt").exists():
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator, *package_compilers(),
             "-DCMAKE_BUILD_TYPE=Release", f"-DLLAMA_SPARSE_UPSTREAM_DIR={src}"],
            check=True, env=env, stdout=sys.stderr,
        )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--target", *targets, "-j", str(os.cpu_count() or 2)],
        check=True, env=env, stdout=sys.stderr,
    )  # fmt: skip
    return build_dir / "bin"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, help="CMake targets to build")
    args = ap.parse_args()
    try:
        print(build(args.targets))
    except fetch.FetchError as e:
        print(f"reference: error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"reference: error: {' '.join(map(str, e.cmd[:3]))} ... failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
