#!/usr/bin/env bash
# Schemathesis against the live service's own /api/schema/, with all its checks (make test-schema).
#
#   bash tests/schema/run.sh [EXTRA SCHEMATHESIS ARGS...]
#
# Starts the fake OpenAI server (markers off: generated prompts are only echoed) and the service
# under uvicorn on a fresh SQLite database in a temporary folder, with the request limits off
# (generated traffic is many requests at once), then runs `schemathesis run` once per mode and
# stops both servers on exit. Exits non-zero on any schemathesis failure. tests/schema/hooks.py
# keeps schema-valid cases within the few constraints the schema can only state in words.
#
# Modes (SCHEMA_MODES, default "anonymous token"):
#   anonymous  the default configuration: no credentials needed (security lists `{}`);
#   token      CHAT_ALLOW_ANONYMOUS=false and `Authorization: Token <key>` of a user made for the
#              run, so that the auth checks (ignored_auth) probe missing and invalid credentials.
#
# Knobs: SCHEMA_MAX_EXAMPLES (cases per operation and phase, default 50), SCHEMA_SEED (default
# fixed, so that CI is reproducible; "random" for a new one each run), SCHEMA_WORKERS (default 2),
# SCHEMA_DATABASE_URL (default: a fresh SQLite file).
# Reports (JUnit XML, and NDJSON events for `st replay`-style digging) go to var/schemathesis/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

MODES="${SCHEMA_MODES:-anonymous token}"
MAX_EXAMPLES="${SCHEMA_MAX_EXAMPLES:-50}"
SEED="${SCHEMA_SEED:-20260101}"
WORKERS="${SCHEMA_WORKERS:-2}"
API_KEY="test-key"

log() { printf '[test-schema] %s\n' "$*" >&2; }

make --no-print-directory install >&2
PY="$ROOT/.venv/bin/python"
ST="$ROOT/.venv/bin/schemathesis"
log "$("$ST" --version)"

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

WORK="$(mktemp -d /tmp/chat-schema.XXXXXX)"
REPORTS="$ROOT/var/schemathesis"
mkdir -p "$REPORTS"
FAKE_PID=""
SERVICE_PID=""

stop_group() {
    # Each server runs in its own process group (setsid): stop the group, then wait for it.
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 -- "-$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -s "$WORK/service.log" ]; then
        log "service log (last lines):"
        tail -n 40 "$WORK/service.log" >&2 || true
    fi
    stop_group "$SERVICE_PID"
    stop_group "$FAKE_PID"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- fake OpenAI server ---------------------------------------------------------------------
FAKE_PORT="$(free_port)"
setsid "$PY" -m tests.fake_openai --host 127.0.0.1 --port "$FAKE_PORT" --latency 0 --chunks 3 \
    --no-markers >"$WORK/fake.log" 2>&1 </dev/null &
FAKE_PID=$!
for _ in $(seq 1 100); do
    grep -q "listening on" "$WORK/fake.log" 2>/dev/null && break
    kill -0 "$FAKE_PID" 2>/dev/null || { log "fake OpenAI server died:"; cat "$WORK/fake.log" >&2; exit 1; }
    sleep 0.1
done
grep -q "listening on" "$WORK/fake.log" || { log "fake OpenAI server did not start"; exit 1; }

# --- the service, once per mode -------------------------------------------------------------
PORT="$(free_port)"
BASE_URL="http://127.0.0.1:$PORT"
# SCHEMA_DATABASE_URL: another (throwaway) database, e.g. postgres://postgres@127.0.0.1:5432/x.
export DATABASE_URL="${SCHEMA_DATABASE_URL:-sqlite:///$WORK/db.sqlite3}"
export OPENAI_API_KEY="$API_KEY"
export OPENAI_BASE_URL="http://127.0.0.1:$FAKE_PORT/v1"
export OPENAI_MAX_RETRIES=0
export OPENAI_TIMEOUT=5
# Generated traffic is many requests at once from one client: no rate or concurrency limits.
export CHAT_THROTTLE_ANON=""
export CHAT_THROTTLE_USER=""
export CHAT_MAX_CONCURRENT_PER_USER=0
export CHAT_STREAM_SAVE_INTERVAL=0.05
# The schema follows the settings: a prompt of at most 1000 characters keeps the generation of
# strings that must match both a pattern and a length fast (32000 makes it ten times slower).
export CHAT_MAX_PROMPT_CHARS=1000
export LOG_LEVEL=ERROR
# Constraints the schema states in words only (tests/schema/hooks.py).
export SCHEMATHESIS_HOOKS=tests.schema.hooks
export SCHEMA_BASE_URL="$BASE_URL"

"$PY" manage.py migrate --noinput -v0

start_service() {
    setsid "$PY" -m uvicorn config.asgi:application --host 127.0.0.1 --port "$PORT" \
        --loop uvloop --http httptools --no-access-log \
        >"$WORK/service.log" 2>&1 </dev/null &
    SERVICE_PID=$!
    for _ in $(seq 1 300); do
        if "$PY" - "$BASE_URL/readyz" <<'PYEOF' 2>/dev/null; then
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PYEOF
            return 0
        fi
        kill -0 "$SERVICE_PID" 2>/dev/null || break
        sleep 0.2
    done
    log "the service did not become ready on $BASE_URL"
    return 1
}

failed=0
for mode in $MODES; do
    auth=()
    export SCHEMA_AUTHORIZATION=""
    case "$mode" in
        anonymous)
            export CHAT_ALLOW_ANONYMOUS=true
            ;;
        token)
            export CHAT_ALLOW_ANONYMOUS=false
            token="$("$PY" manage.py shell -v 0 -c '
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token
user, _ = get_user_model().objects.get_or_create(username="schemathesis")
print(Token.objects.get_or_create(user=user)[0].key)
')"
            export SCHEMA_AUTHORIZATION="Token $token"
            auth=(--header "Authorization: $SCHEMA_AUTHORIZATION")
            ;;
        *)
            log "unknown mode $mode (expected anonymous or token)"
            exit 2
            ;;
    esac
    start_service
    log "mode $mode: schemathesis against $BASE_URL/api/schema/ (max $MAX_EXAMPLES examples, seed $SEED)"
    seed=()
    [ "$SEED" = "random" ] || seed=(--seed "$SEED")
    set +e
    "$ST" run "$BASE_URL/api/schema/" \
        --checks all \
        --max-examples "$MAX_EXAMPLES" \
        "${seed[@]}" \
        --workers "$WORKERS" \
        --request-timeout 30 \
        --generation-database none \
        --report junit,ndjson \
        --report-junit-path "$REPORTS/$mode.xml" \
        --report-ndjson-path "$REPORTS/$mode.ndjson" \
        "${auth[@]}" \
        "$@"
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        log "mode $mode: FAILED (schemathesis exit $rc)"
        failed=1
    else
        log "mode $mode: no failures"
    fi
    stop_group "$SERVICE_PID"
    SERVICE_PID=""
done
exit "$failed"
