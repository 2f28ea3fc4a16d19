"""Settings for the chat service, all read from the environment (and `.env`) here and only here.

Every knob is documented in README.md ("Configuration"); `.env.example` lists them with defaults.
Production settings fail fast: a missing secret or an unsafe combination stops the process at
startup instead of surfacing later.
"""

import ipaddress
import os
import secrets
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)


def _local_secret_key() -> str:
    """A random key generated on first run into a git-ignored file, so that the quick start
    never runs on a public constant. Production sets DJANGO_SECRET_KEY instead."""
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    try:
        # O_EXCL: two processes starting at once agree on the first one's key.
        with path.open("x") as handle:
            handle.write(key)
        path.chmod(0o600)
    except FileExistsError:
        return path.read_text().strip()
    return key


# --- Core -------------------------------------------------------------------------------------
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# Served over HTTPS (production): secure cookies, HTTPS redirect, HSTS. Off for the local
# quick start on plain http://127.0.0.1. With it on, `manage.py check --deploy` is clean.
HTTPS = env.bool("DJANGO_HTTPS", default=False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if HTTPS:
        raise ImproperlyConfigured("DJANGO_HTTPS is on: set DJANGO_SECRET_KEY to a real secret.")
    SECRET_KEY = _local_secret_key()
if HTTPS:
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    # Health probes and metrics scrapes come from inside, over plain HTTP.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=True)
    # Only allows submitting the domain to browsers' preload lists; nothing is submitted.
    SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=True)
    # Behind a proxy that terminates TLS and sets X-Forwarded-Proto.
    if env.bool("DJANGO_BEHIND_TLS_PROXY", default=False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "chat",
    "billing",
    "web",
]

MIDDLEWARE = [
    # Outermost: the request id, the HTTP metrics and the request's log line cover everything
    # below, static files and errors included.
    "config.middleware.RequestObservabilityMiddleware",
    # Django's middleware; those whose hooks do no I/O in async-native form (their hooks run on
    # the event loop instead of a thread each: config/django_middleware.py).
    "config.django_middleware.SecurityMiddleware",
    # Serves the static files (admin, Swagger UI, the chat page) from the app server itself;
    # ServeStatic is WhiteNoise's async-native fork (WhiteNoise's sync-only middleware would
    # move every request's middleware chain to a thread and back).
    "servestatic.middleware.ServeStaticMiddleware",
    "config.django_middleware.SessionMiddleware",
    "config.django_middleware.CommonMiddleware",
    "config.django_middleware.CsrfViewMiddleware",
    "config.django_middleware.AuthenticationMiddleware",
    "config.django_middleware.MessageMiddleware",
    "config.django_middleware.XFrameOptionsMiddleware",
]

# Django looks for these three middleware by exact path; chat/checks.py checks for them (or the
# async-native subclasses above) instead.
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W002", "security.W003"]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------------
# Connections: the async API runs its ORM work on DATABASE_THREADS long-lived threads
# (chat/db.py), each holding one connection for the life of the process. Everything else (admin,
# docs, management commands) follows Django's own per-request handling: CONN_MAX_AGE=0, as
# Django advises under ASGI, so a request's connection is closed (or, on PostgreSQL, returned to
# the pool) when the request ends. Connections per process are therefore bounded.
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
_database = DATABASES["default"]
# SQLite: 8, measured (BENCHMARKS.md): a writer waiting for SQLite's lock sleeps in its busy
# handler, holding a thread, so more threads keep the lock busier. PostgreSQL: 4, since each
# thread holds a server connection.
DATABASE_THREADS = env.int(
    "DATABASE_THREADS",
    default=8 if _database["ENGINE"] == "django.db.backends.sqlite3" else 4,
)
_database["CONN_MAX_AGE"] = 0
if _database["ENGINE"] == "django.db.backends.sqlite3":
    # Many concurrent writers on the embedded default: WAL lets readers run beside the writer,
    # IMMEDIATE takes the write lock at BEGIN (no deadlocking lock upgrades, and transactions
    # that check-then-write are serialized), and the busy timeout makes a writer wait for the
    # lock instead of failing with "database is locked".
    _database.setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": env.float("SQLITE_BUSY_TIMEOUT", default=30.0),
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    _database["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
elif _database["ENGINE"] == "django.db.backends.postgresql":
    # psycopg 3's pool: the database threads hold DATABASE_THREADS connections, requests of the
    # admin and docs borrow the rest. A request that finds the pool empty waits POOL_TIMEOUT.
    _database.setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=2),
        "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=DATABASE_THREADS + 8),
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Shared state (Redis, optional) -----------------------------------------------------------
# With REDIS_URL: the cache, rate-limit counters and live generation events are shared by every
# process on every host. Without it: the database carries what must be shared.
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                # A cache that cannot be reached misses (e.g. the lists' cached counts are then
                # counted again) instead of failing the request.
                "IGNORE_EXCEPTIONS": True,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# The users of valid API tokens, per process (chat.api.authentication).
CACHES["tokens"] = {
    "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
    "LOCATION": "chat-tokens",
    "OPTIONS": {"MAX_ENTRIES": 10000},
}

# --- I18N / static ----------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "servestatic.storage.CompressedStaticFilesStorage"},
}
# Tests and a fresh checkout run without collectstatic: static files are then found in the apps.
SERVESTATIC_USE_FINDERS = env.bool("SERVESTATIC_USE_FINDERS", default=DEBUG)

# --- OpenAI -----------------------------------------------------------------------------------
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="") or None
OPENAI_MODEL = env.str("OPENAI_MODEL", default="gpt-3.5-turbo")
# Bounds the whole upstream call, retries included (for streams: the wait for the first chunk
# and every gap between chunks).
OPENAI_TIMEOUT = env.float("OPENAI_TIMEOUT", default=30.0)
OPENAI_MAX_RETRIES = env.int("OPENAI_MAX_RETRIES", default=2)
# Upstream connections one server process may hold open at once.
OPENAI_MAX_CONNECTIONS = env.int("OPENAI_MAX_CONNECTIONS", default=1000)
# The SDK's HTTP client: "aiohttp" (its DefaultAioHttpClient: less CPU per call, BENCHMARKS.md)
# or "httpx" (its default client). Both honour HTTPS_PROXY / NO_PROXY.
OPENAI_HTTP_CLIENT = env.str("OPENAI_HTTP_CLIENT", default="aiohttp")
if OPENAI_HTTP_CLIENT not in ("aiohttp", "httpx"):
    raise ImproperlyConfigured(
        f"OPENAI_HTTP_CLIENT must be aiohttp or httpx, not {OPENAI_HTTP_CLIENT!r}."
    )
# Models a request (or a conversation) may choose; the default model is always allowed.
OPENAI_ALLOWED_MODELS = sorted(
    set(env.list("OPENAI_ALLOWED_MODELS", default=["gpt-3.5-turbo", "gpt-4o-mini", "gpt-4o"]))
    | {OPENAI_MODEL}
)

# --- Chat behaviour ---------------------------------------------------------------------------
CHAT_MAX_PROMPT_CHARS = env.int("CHAT_MAX_PROMPT_CHARS", default=32000)
# The longest reply, in tokens. Sent upstream as `max_tokens` when a request sets none, so that
# a reply's cost is bounded by what its budget reservation covers.
CHAT_MAX_COMPLETION_TOKENS = env.int("CHAT_MAX_COMPLETION_TOKENS", default=4096)
# Tokens of context (system prompt + earlier turns + new prompt) sent per request; older turns
# are dropped first. Per-model overrides: CHAT_CONTEXT_TOKEN_BUDGETS=gpt-4o=32000,gpt-4o-mini=16000
CHAT_CONTEXT_TOKEN_BUDGET = env.int("CHAT_CONTEXT_TOKEN_BUDGET", default=4000)
CHAT_CONTEXT_TOKEN_BUDGETS = {
    model: int(budget)
    for model, budget in env.dict("CHAT_CONTEXT_TOKEN_BUDGETS", default={}).items()
}
# Conversation titles are cut from the first prompt; with this on, the model writes them
# (one extra, short model call per new conversation, charged to its user).
CHAT_TITLE_FROM_MODEL = env.bool("CHAT_TITLE_FROM_MODEL", default=False)
# A streaming reply's partial text is written to the database at most this often (seconds).
CHAT_STREAM_SAVE_INTERVAL = env.float("CHAT_STREAM_SAVE_INTERVAL", default=1.0)
# A comment line is sent on an event stream that has been quiet this long (seconds).
CHAT_SSE_KEEPALIVE_SECONDS = env.float("CHAT_SSE_KEEPALIVE_SECONDS", default=15.0)
# Every process marks its generations alive this often; a generation not marked for
# CHAT_GENERATION_DEAD_AFTER seconds (its process died, on any host) is stored as interrupted
# by whichever process notices first.
CHAT_GENERATION_DEAD_AFTER = env.float("CHAT_GENERATION_DEAD_AFTER", default=30.0)
CHAT_HEARTBEAT_INTERVAL = env.float(
    "CHAT_HEARTBEAT_INTERVAL", default=max(0.05, CHAT_GENERATION_DEAD_AFTER / 3)
)
if CHAT_HEARTBEAT_INTERVAL * 2 > CHAT_GENERATION_DEAD_AFTER:
    raise ImproperlyConfigured(
        "CHAT_HEARTBEAT_INTERVAL must be at most half of CHAT_GENERATION_DEAD_AFTER."
    )
# How often a process looks for stop requests made on another process (without Redis).
CHAT_CANCEL_POLL_INTERVAL = env.float("CHAT_CANCEL_POLL_INTERVAL", default=1.0)
# `?search=`: the longest term, and how many of the newest messages in scope a search scans
# where no index serves it (SQLite always; PostgreSQL for terms under 3 characters). 0: all.
CHAT_SEARCH_MAX_LENGTH = env.int("CHAT_SEARCH_MAX_LENGTH", default=200)
CHAT_SEARCH_SCAN_LIMIT = env.int("CHAT_SEARCH_SCAN_LIMIT", default=10000)
# Lists' `count`: exact up to this many items; above, an exact count cached this many seconds
# (a deep history is read with `?cursor=` instead).
CHAT_LIST_EXACT_COUNT_LIMIT = env.int("CHAT_LIST_EXACT_COUNT_LIMIT", default=10000)
CHAT_LIST_COUNT_CACHE_SECONDS = env.int("CHAT_LIST_COUNT_CACHE_SECONDS", default=60)

# --- Users --------------------------------------------------------------------------------------
# On: requests without credentials act as one shared user (CHAT_ANONYMOUS_USERNAME), throttled
# per client IP, so that the original contract works with no credentials (the local quick
# start). Off: every API endpoint but /healthz and /readyz answers 401 without credentials.
# Production settings (DJANGO_HTTPS) refuse it unless it is set explicitly.
CHAT_ALLOW_ANONYMOUS = env.bool("CHAT_ALLOW_ANONYMOUS", default=not HTTPS)
CHAT_ANONYMOUS_USERNAME = env.str("CHAT_ANONYMOUS_USERNAME", default="anonymous")
# How long a process remembers a valid API token's user (0: it reads it on every request).
# A token rotated or deleted, or a user deactivated, in another process (e.g. manage.py
# create_token --rotate) keeps working in this one for at most that long.
CHAT_TOKEN_CACHE_SECONDS = env.float("CHAT_TOKEN_CACHE_SECONDS", default=5.0)
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"

# --- Web chat page (web/) ---------------------------------------------------------------------
# The browser chat page at `/` (with /login/ and /logout/, LOGIN_URL above), a client of the
# API; off: they answer the JSON 404.
CHAT_WEB_UI = env.bool("CHAT_WEB_UI", default=True)

# --- REST framework / OpenAPI -----------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "chat.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["chat.api.authentication.IsUserOrAnonymousAllowed"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "chat.api.pagination.PageNumberPagination",
    "PAGE_SIZE": 20,
    "EXCEPTION_HANDLER": "chat.api.errors.exception_handler",
    # drf-spectacular's AutoSchema, plus every operation's error responses (chat.api.schema).
    "DEFAULT_SCHEMA_CLASS": "chat.api.schema.ChatAutoSchema",
    # `?format=` belongs to the export endpoint (json|markdown), not to renderer selection.
    "URL_FORMAT_OVERRIDE": None,
    # Proxies in front of the service whose X-Forwarded-For is trusted for the client IP
    # (anonymous rate limits); 0 trusts none and uses the peer address.
    "NUM_PROXIES": env.int("CHAT_TRUSTED_PROXIES", default=0),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Chat API",
    "DESCRIPTION": (
        "Chat with OpenAI models. Every message stores the prompt and the reply; the timestamp "
        "field is `created_at` everywhere (the original contract's list example called it "
        "`timestamp`).\n\n"
        "**Errors.** Every error response has the shape "
        '`{"error": {"status", "code", "message", ...}}` (the `Error` schema); each operation '
        "lists the statuses it can answer and the `code`s of each. A method an operation does "
        "not have answers 405 `method_not_allowed` with an `Allow` header.\n\n"
        "**Credentials.** `Authorization: Token <key>` or `Authorization: Bearer <key>`, or "
        "Django's session (writes then need the CSRF token); while the server allows anonymous "
        "use (CHAT_ALLOW_ANONYMOUS), none: requests without credentials act as one shared "
        "user.\n\n"
        "**Limits** (the allowed models, the longest prompt, the largest `max_tokens`, the "
        "longest search) are those of this server's configuration."
    ),
    "VERSION": "2.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's assets are served by this service (no CDN): the docs work offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Observability: metrics, request ids, logs -------------------------------------------------
# Prometheus metrics (GET /metrics), in prometheus-client's multiprocess mode: each server process
# writes its samples to files under METRICS_DIR, and a scrape adds up all the processes' files.
# Each server run gets a directory of its own (chat/metrics_dir.py), named after the process that
# owns the run (uvicorn's supervisor, or the single process); those of runs that are gone are
# removed. prometheus-client reads PROMETHEUS_MULTIPROC_DIR when it is first imported, which
# happens after the settings are loaded: it is set here, for every process.
from chat import metrics_dir as _metrics_dir  # noqa: E402

METRICS_DIR = Path(env.str("METRICS_DIR", default=str(VAR_DIR / "metrics")))
if not METRICS_DIR.is_absolute():
    METRICS_DIR = BASE_DIR / METRICS_DIR
METRICS_RUN_DIR = _metrics_dir.run_dir(METRICS_DIR)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_RUN_DIR)
# Set: /metrics requires `Authorization: Bearer <METRICS_TOKEN>` (from anywhere). Unset: /metrics
# answers only clients whose address is in METRICS_ALLOWED_IPS (addresses or networks).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
try:
    METRICS_ALLOWED_IPS = [
        ipaddress.ip_network(value.strip(), strict=False)
        for value in env.list("METRICS_ALLOWED_IPS", default=["127.0.0.0/8", "::1"])
        if value.strip()
    ]
except ValueError as _exc:
    raise ImproperlyConfigured(f"METRICS_ALLOWED_IPS: {_exc}.") from None

# Logs: one line per record on stderr, JSON (python-json-logger) or plain text. Every record
# carries the request id (chat.logs.RequestIdFilter) and nothing secret-shaped
# (chat.logs.RedactSecretsFilter). Each request is logged once, by config.middleware, on the
# "chat.request" logger.
from pythonjsonlogger.core import RESERVED_ATTRS as _JSON_LOG_RESERVED_ATTRS  # noqa: E402

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str("LOG_FORMAT", default="plain" if DEBUG else "json").strip().lower()
if LOG_FORMAT not in ("json", "plain"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or plain, not {LOG_FORMAT!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "chat.logs.RequestIdFilter"},
        "redact_secrets": {"()": "chat.logs.RedactSecretsFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(message)s %(request_id)s",
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": "time",
            # uvicorn adds a copy of its messages with terminal colours.
            "reserved_attrs": [*_JSON_LOG_RESERVED_ATTRS, "color_message"],
            "json_ensure_ascii": False,
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id", "redact_secrets"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # uvicorn's own lines (startup, shutdown, errors) in the same format. Not the "uvicorn"
        # logger: configuring it would reset its children, uvicorn.access (--no-access-log) too.
        "uvicorn.error": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        # Django's one warning per 4xx response repeats the request line; errors stay.
        "django.request": {"level": "ERROR"},
        # SQL debug lines (DEBUG on) would carry the token looked up for each request.
        "django.db.backends": {"level": "INFO"},
        # The SDK's and its HTTP clients' debug logs can include request headers; keep them quiet.
        "openai": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "httpcore2": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}

# --- Billing: prices, budgets, rate limits ----------------------------------------------------
# Parsed here so that a bad value stops the service at startup. billing.money/prices/periods/
# rates import nothing from Django's app registry.
from billing import money as _money  # noqa: E402
from billing.periods import PERIODS as _BUDGET_PERIODS  # noqa: E402
from billing.prices import parse_model_prices as _parse_model_prices  # noqa: E402
from billing.rates import parse_rate as _parse_rate  # noqa: E402

# USD per million input:output tokens, merged over OpenAI's list prices for the default models
# (billing.prices.DEFAULT_PRICES), e.g. CHAT_MODEL_PRICES=gpt-4o=2.50:10.00,llama3=0:0. Every
# allowed model needs a price. Parsed into {model: billing.prices.ModelPrice}.
CHAT_MODEL_PRICES = _parse_model_prices(
    env.str("CHAT_MODEL_PRICES", default=""), allowed_models=OPENAI_ALLOWED_MODELS
)
# Default budget of each user per period, in USD (accounts may override it); empty: unlimited.
_budget = env.str("CHAT_USER_BUDGET_USD", default="").strip()
try:
    CHAT_USER_BUDGET_USD = (
        _money.parse_usd(_budget, variable="CHAT_USER_BUDGET_USD") if _budget else None
    )
except ValueError as _exc:
    raise ImproperlyConfigured(f"{_exc} (a budget in USD, or empty for unlimited).") from None
# Budgets are per calendar day, week (from Monday) or month, in UTC.
CHAT_USER_BUDGET_PERIOD = env.str("CHAT_USER_BUDGET_PERIOD", default="month").strip().lower()
if CHAT_USER_BUDGET_PERIOD not in _BUDGET_PERIODS:
    raise ImproperlyConfigured(
        f"CHAT_USER_BUDGET_PERIOD must be day, week or month, not {CHAT_USER_BUDGET_PERIOD!r}."
    )
# Requests per user / per anonymous client IP, in DRF's format (30/min, 100/hour, 1000/day);
# empty: no limit. Shared by all server processes (Redis with REDIS_URL, else the database).
CHAT_THROTTLE_USER = env.str("CHAT_THROTTLE_USER", default="").strip()
CHAT_THROTTLE_ANON = env.str("CHAT_THROTTLE_ANON", default="30/min").strip()
for _name, _rate in (
    ("CHAT_THROTTLE_USER", CHAT_THROTTLE_USER),
    ("CHAT_THROTTLE_ANON", CHAT_THROTTLE_ANON),
):
    try:
        _parse_rate(_rate)
    except ValueError as _exc:
        raise ImproperlyConfigured(f"{_name}: {_exc}.") from None
try:
    # Replies one user may have generating at once (0: no cap).
    CHAT_MAX_CONCURRENT_PER_USER = env.int("CHAT_MAX_CONCURRENT_PER_USER", default=4)
    # Seconds a generation's budget reservation lives unless its process's heartbeat extends
    # it (so a killed process's reservations stop counting after this).
    CHAT_RESERVATION_TTL_SECONDS = env.float(
        "CHAT_RESERVATION_TTL_SECONDS", default=OPENAI_TIMEOUT + 30
    )
except ValueError as _exc:
    raise ImproperlyConfigured(f"Billing settings: {_exc}.") from None
if CHAT_MAX_CONCURRENT_PER_USER < 0:
    raise ImproperlyConfigured("CHAT_MAX_CONCURRENT_PER_USER must be 0 (no cap) or more.")
if not CHAT_RESERVATION_TTL_SECONDS > 0:
    raise ImproperlyConfigured("CHAT_RESERVATION_TTL_SECONDS must be more than 0.")
