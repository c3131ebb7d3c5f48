#!/usr/bin/env bash
# Stop at once, with what to install, when Python >= 3.11, Java >= 17 or a C++ compiler is missing.
set -u
fail() { echo "ERROR: $*" >&2; exit 1; }
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || fail "Python 3.11+ not found ($PY). Install Python 3.11 (e.g. apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.11."
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || fail "Python 3.11+ is required, found $("$PY" --version 2>&1). Install Python 3.11 or set PYTHON=/path/to/python3.11."
"$PY" -c 'import venv, ensurepip' 2>/dev/null || fail "Python's venv/ensurepip module is missing: apt-get install python3.11-venv."
command -v java >/dev/null 2>&1 || fail "Java 17+ not found (Spark needs it). Install OpenJDK 17: apt-get install openjdk-17-jre-headless."
jv=$(java -version 2>&1 | awk -F'"' '/version/ {print $2}' | cut -d. -f1)
[ "${jv:-0}" -ge 17 ] 2>/dev/null || fail "Java 17+ is required, found '$(java -version 2>&1 | head -1)'. Install OpenJDK 17: apt-get install openjdk-17-jre-headless."
# `reki setup` builds llama.cpp's server (the local LLM server) from source once per machine.
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
  || fail "A C++ compiler is needed to build llama.cpp's server once (reki setup). Install it: apt-get install g++."
exit 0
