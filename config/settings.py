"""Settings for the chat service, all read from the environment (and `.env`) here and only here.

Every knob is documented in README.md ("Configuration"); `.env.example` lists them with defaults.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

# --- Core -------------------------------------------------------------------------------------
DEBUG = env.bool("DJANGO_DEBUG", default=False)
# The fallback only exists so that `make run` works on a fresh clone; production must set one.
_INSECURE_DEV_SECRET = "insecure-local-development-secret-do-not-use-in-production"
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="") or _INSECURE_DEV_SECRET
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# Served over HTTPS (production): secure cookies, HTTPS redirect, HSTS. Off for the local
# quick start on plain http://127.0.0.1. With it on, `manage.py check --deploy` is clean.
HTTPS = env.bool("DJANGO_HTTPS", default=False)
if HTTPS:
    if SECRET_KEY == _INSECURE_DEV_SECRET:
        raise ImproperlyConfigured("DJANGO_HTTPS is on: set DJANGO_SECRET_KEY to a real secret.")
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
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
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "chat",
    "web",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's and Swagger UI's static files from the app server itself.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# /api/ is served by a second handler (config.asgi) with only these, run inline on the event loop;
# the admin and the docs pages get the full MIDDLEWARE above.
API_MIDDLEWARE = [
    "config.middleware.SecurityMiddleware",
    "config.middleware.CommonMiddleware",
]
API_PATH_PREFIX = "/api/"

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
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Many concurrent writers on the embedded default: WAL lets readers run beside the writer,
    # IMMEDIATE takes the write lock at BEGIN (no deadlocking lock upgrades), and the busy
    # timeout makes a writer wait for the lock instead of failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": env.float("SQLITE_BUSY_TIMEOUT", default=30.0),
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Connections live in the few database threads (chat.db) for the life of the process.
    DATABASES["default"]["CONN_MAX_AGE"] = None
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "var" / "test-db.sqlite3")}
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Threads that run ORM work for the async chat path (each keeps one database connection).
DATABASE_THREADS = env.int("DATABASE_THREADS", default=4)
# SQLite only: the chat's two short writes are tried on the event loop itself (chat.db.write).
DATABASE_INLINE_WRITES = env.bool("DATABASE_INLINE_WRITES", default=True)
# Seconds between GIL hand-overs (Python's default is 0.005); see config/asgi.py.
GIL_SWITCH_INTERVAL = env.float("GIL_SWITCH_INTERVAL", default=0.0005)
# Allocations between collections of the youngest GC generation (Python's default: 700; 0 keeps
# it); see config/asgi.py.
GC_GEN0_THRESHOLD = env.int("GC_GEN0_THRESHOLD", default=10000)

# --- Cache ------------------------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- I18N / static ----------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Tests and a fresh checkout run without collectstatic; WhiteNoise then finds files in the apps.
WHITENOISE_USE_FINDERS = env.bool("WHITENOISE_USE_FINDERS", default=DEBUG)

# --- OpenAI -----------------------------------------------------------------------------------
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="") or None
OPENAI_MODEL = env.str("OPENAI_MODEL", default="gpt-3.5-turbo")
# Bounds the whole upstream call, the SDK's own retries included.
OPENAI_TIMEOUT = env.float("OPENAI_TIMEOUT", default=30.0)
OPENAI_MAX_RETRIES = env.int("OPENAI_MAX_RETRIES", default=2)
# Upstream connections the service may hold open at once (per server process).
OPENAI_MAX_CONNECTIONS = env.int("OPENAI_MAX_CONNECTIONS", default=2000)
# HTTP transport under the SDK: "httptools" (chat/http_transport.py; the least CPU, see
# BENCHMARKS.md), "aiohttp" (the SDK's adapter) or "httpx" (its default, which honours proxies).
OPENAI_HTTP_BACKEND = env.str("OPENAI_HTTP_BACKEND", default="httptools")
if OPENAI_HTTP_BACKEND not in ("httptools", "aiohttp", "httpx"):
    raise ImproperlyConfigured(
        f"OPENAI_HTTP_BACKEND must be httptools, aiohttp or httpx, not {OPENAI_HTTP_BACKEND!r}."
    )

# Models a request (or a conversation) may choose; the default model is always allowed.
OPENAI_ALLOWED_MODELS = sorted(
    set(env.list("OPENAI_ALLOWED_MODELS", default=["gpt-3.5-turbo", "gpt-4o-mini", "gpt-4o"]))
    | {OPENAI_MODEL}
)

# --- Chat behaviour ---------------------------------------------------------------------------
CHAT_MAX_PROMPT_CHARS = env.int("CHAT_MAX_PROMPT_CHARS", default=32000)
# Upper bound for a request's `max_tokens` (the reply length a client may ask for).
CHAT_MAX_COMPLETION_TOKENS = env.int("CHAT_MAX_COMPLETION_TOKENS", default=4096)
# Tokens of context (system prompt + earlier turns + new prompt) sent per request; older turns
# are dropped first. Per-model overrides: CHAT_CONTEXT_TOKEN_BUDGETS=gpt-4o=32000,gpt-4o-mini=16000
CHAT_CONTEXT_TOKEN_BUDGET = env.int("CHAT_CONTEXT_TOKEN_BUDGET", default=4000)
CHAT_CONTEXT_TOKEN_BUDGETS = {
    model: int(budget)
    for model, budget in env.dict("CHAT_CONTEXT_TOKEN_BUDGETS", default={}).items()
}
# Conversation titles are cut from the first prompt; with this on, the model writes them
# (one extra, short model call per new conversation).
CHAT_TITLE_FROM_MODEL = env.bool("CHAT_TITLE_FROM_MODEL", default=False)
# A streaming reply's partial text is written to the database at most this often (seconds).
CHAT_STREAM_SAVE_INTERVAL = env.float("CHAT_STREAM_SAVE_INTERVAL", default=1.0)
# A comment line is sent on an event stream that has been quiet this long (seconds).
CHAT_SSE_KEEPALIVE_SECONDS = env.float("CHAT_SSE_KEEPALIVE_SECONDS", default=15.0)
# At startup, generations not updated for this long are marked interrupted (their process died).
CHAT_STALE_GENERATION_SECONDS = env.float("CHAT_STALE_GENERATION_SECONDS", default=300.0)

# --- Web chat page (web/) ---------------------------------------------------------------------
# The browser chat page at `/`, a client of the API above; off: `/` answers the JSON 404.
CHAT_WEB_UI = env.bool("CHAT_WEB_UI", default=True)
LOGIN_URL = "web:login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# --- REST framework / OpenAPI -----------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_PARSER_CLASSES": ["chat.api.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "chat.api.pagination.MessagePagination",
    "PAGE_SIZE": 20,
    "EXCEPTION_HANDLER": "chat.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # `?format=` belongs to the export endpoint (json|markdown), not to renderer selection.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Chat API",
    "DESCRIPTION": (
        "Chat with OpenAI models. Every message stores the prompt and the reply; the timestamp "
        "field is `created_at` everywhere (the original contract's list example called it "
        "`timestamp`). Every error response has the shape "
        '`{"error": {"status", "code", "message", ...}}`.'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's assets are served by this service (no CDN): the docs work offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Logging ----------------------------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # The SDK's and httpx's debug logs can include request headers; keep them quiet.
    "loggers": {
        "openai": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "httpcore2": {"level": "WARNING"},
    },
}
