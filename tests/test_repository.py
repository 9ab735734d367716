"""What must never be committed."""

from __future__ import annotations

import subprocess

from conftest import ROOT


def tracked(*patterns: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", *patterns], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return out.stdout.split()


def test_upstream_is_not_tracked() -> None:
    assert tracked("vendor/llama.cpp") == []


def test_no_model_files_are_tracked() -> None:
    assert tracked("*.gguf", "*.safetensors", "*.bin", "*.pt") == []


def test_every_patch_has_a_dep3_header() -> None:
    for path in (ROOT / "vendor" / "patches").glob("*.patch"):
        header = path.read_text().split("diff --git", 1)[0]
        for field in ("Description:", "Forwarded:", "Last-Update:"):
            assert field in header, f"{path.name} lacks {field}"
