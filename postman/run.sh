#!/usr/bin/env bash
# Runs the Postman collection against a live service backed by the fake OpenAI server.
#
#   bash postman/run.sh            (or: make postman)
#
# Installs newman under postman/.npm if needed, starts tests/fake_openai.py and the service
# (`make run`) on free ports with a throwaway SQLite database and anonymous use off (as in
# production), waits for it, creates an API token with `manage.py create_token`, runs newman
# with it (the collection sends `Authorization: Token <token>`) and stops both servers on exit.
# The exit code is newman's. Extra arguments go to newman.
set -euo pipefail

NEWMAN_VERSION="6.2.2" # works with Node >= 16
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NPM_PREFIX="$ROOT/postman/.npm"
NEWMAN="$NPM_PREFIX/node_modules/.bin/newman"
COLLECTION="postman/chat-api.postman_collection.json"
ENVIRONMENT="postman/chat-api.postman_environment.json"
API_KEY="test-key"
TOKEN_USER="postman"

log() { printf '[postman] %s\n' "$*" >&2; }

# --- newman ---------------------------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node and npm are needed (Debian: apt-get install -y nodejs npm)"
    exit 2
fi
installed="$( [ -x "$NEWMAN" ] && "$NEWMAN" --version 2>/dev/null || true)"
if [ "$installed" != "$NEWMAN_VERSION" ]; then
    log "installing newman@$NEWMAN_VERSION into postman/.npm"
    mkdir -p "$NPM_PREFIX"
    npm install --no-save --no-audit --no-fund --no-package-lock --loglevel=error \
        --prefix "$NPM_PREFIX" "newman@$NEWMAN_VERSION" >&2
fi
log "newman $("$NEWMAN" --version), node $(node --version)"

# --- python environment (also gives the fake server its interpreter) ------------------------
make --no-print-directory install >&2
PY="$ROOT/.venv/bin/python"

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

WORK="$(mktemp -d /tmp/chat-postman.XXXXXX)"
FAKE_PID=""
SERVICE_PID=""

stop() {
    # Each server runs in its own process group (setsid): stop the group, then wait for it.
    local pid
    for pid in "$SERVICE_PID" "$FAKE_PID"; do
        [ -n "$pid" ] || continue
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    for pid in "$SERVICE_PID" "$FAKE_PID"; do
        [ -n "$pid" ] || continue
        for _ in $(seq 1 50); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -s "$WORK/service.log" ] && [ "${NEWMAN_RAN:-0}" = 0 ]; then
        log "service log:"
        tail -n 50 "$WORK/service.log" >&2 || true
    fi
    stop
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- fake OpenAI server ---------------------------------------------------------------------
FAKE_PORT="$(free_port)"
setsid "$PY" -m tests.fake_openai --host 127.0.0.1 --port "$FAKE_PORT" --latency 0.05 --chunks 5 \
    >"$WORK/fake.log" 2>&1 </dev/null &
FAKE_PID=$!
for _ in $(seq 1 100); do
    grep -q "listening on" "$WORK/fake.log" 2>/dev/null && break
    kill -0 "$FAKE_PID" 2>/dev/null || { log "fake OpenAI server died:"; cat "$WORK/fake.log" >&2; exit 1; }
    sleep 0.1
done
grep -q "listening on" "$WORK/fake.log" || { log "fake OpenAI server did not start"; exit 1; }
log "$(head -n 1 "$WORK/fake.log")"

# --- the service ----------------------------------------------------------------------------
PORT="$(free_port)"
BASE_URL="http://127.0.0.1:$PORT"
setsid env \
    PORT="$PORT" \
    OPENAI_API_KEY="$API_KEY" \
    OPENAI_BASE_URL="http://127.0.0.1:$FAKE_PORT/v1" \
    OPENAI_MODEL="gpt-3.5-turbo" \
    OPENAI_MAX_RETRIES=0 \
    OPENAI_TIMEOUT=5 \
    DATABASE_URL="sqlite:///$WORK/db.sqlite3" \
    CHAT_ALLOW_ANONYMOUS=false \
    make --no-print-directory run >"$WORK/service.log" 2>&1 </dev/null &
SERVICE_PID=$!
log "starting the service on $BASE_URL"
ready=0
for _ in $(seq 1 600); do
    if "$PY" - "$BASE_URL/readyz" <<'PYEOF' 2>/dev/null; then
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PYEOF
        ready=1
        break
    fi
    kill -0 "$SERVICE_PID" 2>/dev/null || break
    sleep 0.5
done
if [ "$ready" != 1 ]; then
    log "the service did not answer on $BASE_URL/readyz"
    exit 1
fi
log "service ready"

# --- an API token (the service has migrated the database by now) -----------------------------
TOKEN="$(DATABASE_URL="sqlite:///$WORK/db.sqlite3" "$PY" manage.py create_token "$TOKEN_USER")"
log "API token of user $TOKEN_USER created"

# --- newman ---------------------------------------------------------------------------------
NEWMAN_RAN=1
set +e
"$NEWMAN" run "$COLLECTION" \
    --environment "$ENVIRONMENT" \
    --env-var "baseUrl=$BASE_URL" \
    --env-var "openaiApiKey=$API_KEY" \
    --env-var "token=$TOKEN" \
    --env-var "tokenUser=$TOKEN_USER" \
    --env-var "anonymousAllowed=false" \
    --timeout-request 20000 \
    --color "$([ -t 1 ] && echo on || echo off)" \
    "$@"
rc=$?
set -e
exit "$rc"
