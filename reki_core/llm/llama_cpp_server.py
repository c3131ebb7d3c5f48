"""llama.cpp's OpenAI-compatible server (`llama-server`), the local stack's warm LLM server on CPU.

PyPI has no llama.cpp server binary; the pinned `llama-cpp-python` source distribution vendors llama.cpp's
sources, whose `llama-server` target is upstream's own server (parallel slots, continuous batching, GGUF weights
read natively, no dequantisation). `ensure_llama_server` downloads that sdist with pip, checks its sha256, builds
the one target with cmake (pinned in requirements.txt) and the machine's C++ compiler (a few minutes on 2 cores,
once), and keeps the binary in a per-machine cache (`$XDG_CACHE_HOME/reki`, like pip's wheel cache) that later
set-ups and fresh clones on the same machine reuse. The build happens in a temporary folder renamed into place
when complete, so an interrupted set-up never leaves a half binary. Python's `llama-cpp-python` itself is not
installed: its own server answers one request at a time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from reki_core.fingerprint import file_sha256

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PROVENANCE_FILE = "REKI_BUILD.json"
# One static binary without network features or the web UI (the server is an API for shards, nothing else).
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON")


class LlamaServerBuildError(RuntimeError):
    """llama-server could not be downloaded, verified or built."""


def default_cache_dir() -> Path:
    """Per machine, shared by every checkout: `$REKI_CACHE_DIR`, else `$XDG_CACHE_HOME/reki`, else ~/.cache/reki."""
    if os.environ.get("REKI_CACHE_DIR"):
        return Path(os.environ["REKI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reki"


def build_dir(cache_dir: Path) -> Path:
    """Where one build lives: per pinned sources and machine type (built for this machine's CPU, -march=native)."""
    return cache_dir / "llama.cpp" / f"{LLAMA_CPP_SDIST_SHA256[:12]}-native-{platform.machine()}"


def server_binary(cache_dir: Path | None = None) -> Path:
    return build_dir(cache_dir or default_cache_dir()) / "bin" / "llama-server"


def is_built(folder: Path) -> bool:
    try:
        provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return provenance.get("sdist_sha256") == LLAMA_CPP_SDIST_SHA256 and os.access(folder / "bin" / "llama-server", os.X_OK)


def _cmake() -> str:
    """The venv's cmake (requirements.txt pins it), else the machine's."""
    beside = Path(sys.executable).parent / "cmake"
    found = str(beside) if beside.is_file() else shutil.which("cmake")
    if found is None:
        raise LlamaServerBuildError("building llama-server needs cmake: `make setup` installs it into the venv")
    return found


def download_sdist(download_dir: Path, report: Callable[[str], None] = print) -> Path:
    """The pinned sdist (pip download, reused when present), its sha256 checked; a mismatch removes it."""
    download_dir.mkdir(parents=True, exist_ok=True)
    sdist = download_dir / LLAMA_CPP_SDIST_FILE
    if not sdist.is_file():
        report(f"downloading {LLAMA_CPP_SDIST} (llama.cpp's sources) with pip into {download_dir}")
        # The sdist of this package only: `:all:` would make pip build its build tools (cmake) from source too, just
        # to read the package's metadata (half an hour on 2 cores, against seconds).
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_CPP_SDIST.split("==")[0],
               "--progress-bar", "on", LLAMA_CPP_SDIST, "-d", str(download_dir)]
        result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0 or not sdist.is_file():
            raise LlamaServerBuildError(f"could not download {LLAMA_CPP_SDIST} with pip: {result.stderr.strip()[-500:]}")
    actual = file_sha256(sdist)
    if actual != LLAMA_CPP_SDIST_SHA256:
        sdist.unlink()
        raise LlamaServerBuildError(f"{sdist}: sha256 {actual}, expected {LLAMA_CPP_SDIST_SHA256}; "
                                    "the download is corrupt or the release changed: retry")
    return sdist


def ensure_llama_server(download_dir: Path, cache_dir: Path | None = None,
                        report: Callable[[str], None] = print) -> Path:
    """The `llama-server` binary, built once per machine from the pinned sources."""
    folder = build_dir(cache_dir or default_cache_dir())
    if is_built(folder):
        return folder / "bin" / "llama-server"
    cmake = _cmake()
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise LlamaServerBuildError("building llama-server needs a C++ compiler on PATH: apt-get install g++")
    sdist = download_sdist(download_dir, report)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".partial-{folder.name}-") as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = Path(tmp) / LLAMA_CPP_SDIST_FILE.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        flags = [*CMAKE_FLAGS, "-DGGML_NATIVE=ON"]
        jobs = str(os.cpu_count() or 1)
        report(f"building llama-server from {LLAMA_CPP_SDIST} (cmake, {jobs} jobs; a few minutes, once per machine)")
        started = time.perf_counter()
        for cmd in ([cmake, "-S", str(source), "-B", f"{tmp}/build", *flags],
                    [cmake, "--build", f"{tmp}/build", "--target", "llama-server", "-j", jobs]):
            result = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)  # cmake's [ n%] shows progress
            if result.returncode != 0:
                raise LlamaServerBuildError(f"{' '.join(cmd[:3])}: failed: {result.stderr.strip()[-1500:]}")
        staging = Path(tmp) / "out"
        (staging / "bin").mkdir(parents=True)
        shutil.copy2(Path(tmp) / "build" / "bin" / "llama-server", staging / "bin" / "llama-server")
        shutil.copy2(source / "LICENSE", staging / "LICENSE")
        (staging / PROVENANCE_FILE).write_text(json.dumps({
            "source": LLAMA_CPP_SDIST, "sdist_sha256": LLAMA_CPP_SDIST_SHA256, "target": "llama-server",
            "cmake_flags": flags, "licence": "MIT (llama.cpp)", "build_seconds": round(time.perf_counter() - started, 1),
        }, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished or foreign build: replaced whole
        staging.rename(folder)
    return folder / "bin" / "llama-server"


if __name__ == "__main__":  # by hand: python -m reki_core.llm.llama_cpp_server (`reki setup` calls it too)
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--download-dir", default=".reki/downloads")
    parser.add_argument("--cache-dir", default=None, help="default: $REKI_CACHE_DIR, else $XDG_CACHE_HOME/reki")
    args = parser.parse_args()
    print(ensure_llama_server(Path(args.download_dir), Path(args.cache_dir) if args.cache_dir else None))
