"""Building llama.cpp's server at set-up: the pinned sources' sha256 is checked, a finished build is reused and
a half or foreign one is not."""

from __future__ import annotations

import json
import subprocess

import pytest

from reki_core.llm import llama_cpp_server as lcs


def test_a_corrupt_download_is_removed_and_named(tmp_path):
    sdist = tmp_path / lcs.LLAMA_CPP_SDIST_FILE
    sdist.write_bytes(b"not the pinned sources")
    with pytest.raises(lcs.LlamaServerBuildError, match="sha256 .* expected " + lcs.LLAMA_CPP_SDIST_SHA256):
        lcs.download_sdist(tmp_path, report=lambda _: None)
    assert not sdist.exists()  # the next set-up downloads it again


def test_only_a_finished_build_of_the_pinned_sources_counts(tmp_path):
    folder = lcs.build_dir(tmp_path)
    assert lcs.server_binary(tmp_path) == folder / "bin" / "llama-server"
    (folder / "bin").mkdir(parents=True)
    binary = folder / "bin" / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert not lcs.is_built(folder)  # no provenance: an interrupted or hand-made folder
    (folder / lcs.PROVENANCE_FILE).write_text(json.dumps({"sdist_sha256": "0" * 64}))
    assert not lcs.is_built(folder)  # other sources
    (folder / lcs.PROVENANCE_FILE).write_text(json.dumps({"sdist_sha256": lcs.LLAMA_CPP_SDIST_SHA256}))
    assert lcs.is_built(folder)
    assert lcs.ensure_llama_server(tmp_path / "downloads", cache_dir=tmp_path) == binary  # reused, nothing built


def test_the_cache_is_per_machine_not_per_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("REKI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lcs.default_cache_dir() == tmp_path / "reki"
    monkeypatch.setenv("REKI_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert lcs.default_cache_dir() == tmp_path / "elsewhere"


def test_only_the_package_itself_is_fetched_as_sources(monkeypatch, tmp_path):
    """`--no-binary :all:` made pip build cmake from source just to read the sdist's metadata (30 min on 2 cores)."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        (tmp_path / lcs.LLAMA_CPP_SDIST_FILE).write_bytes(b"not the release")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(lcs.subprocess, "run", fake_run)
    with pytest.raises(lcs.LlamaServerBuildError):  # the fake bytes fail the sha256 check
        lcs.download_sdist(tmp_path, report=lambda _: None)
    no_binary = calls[0][calls[0].index("--no-binary") + 1]
    assert no_binary == "llama-cpp-python"
