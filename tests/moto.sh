# shellcheck shell=bash
# Helpers to run moto_server (DynamoDB, S3, Secrets Manager, EventBridge, SQS)
# on loopback for the tests and the local simulation. Source, then `start_moto`.

MOTO_VERSION="${MOTO_VERSION:-5.1.22}"
VENV="${VENV:-.venv}"

CFN_LINT_VERSION="${CFN_LINT_VERSION:-1.58.0}"

ensure_moto() {
  if [ ! -x "$VENV/bin/moto_server" ]; then
    echo "installing moto[server] into $VENV ..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  fi
}

ensure_cfn_lint() {
  if [ ! -x "$VENV/bin/cfn-lint" ]; then
    echo "installing cfn-lint into $VENV ..." >&2
    [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "cfn-lint==$CFN_LINT_VERSION"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_moto() {
  ensure_moto
  local port log
  port="$(free_port)"
  log="$(mktemp -t moto.XXXXXX.log)"
  # One request at a time, so conditional writes are atomic as in DynamoDB (see the script).
  "$VENV/bin/python" "$(dirname "${BASH_SOURCE[0]}")/moto_server.py" 127.0.0.1 "$port" >"$log" 2>&1 &
  MOTO_PID=$!
  trap 'kill "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/')" 2>/dev/null; then
      break
    fi
    if ! kill -0 "$MOTO_PID" 2>/dev/null; then
      echo "moto_server did not start:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.2
  done
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_SESSION_TOKEN=testing
  export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  export AWS_EC2_METADATA_DISABLED=true
  echo "moto_server on $AWS_ENDPOINT_URL (pid $MOTO_PID)" >&2
}
