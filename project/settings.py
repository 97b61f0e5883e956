"""Skiplock settings: one module, everything from the environment (12-factor)."""

from __future__ import annotations

import datetime as dt
import secrets
import warnings
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

from project.env import env_bool, env_choice, env_float, env_int, env_list, env_secret, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = BASE_DIR / ".skiplock"

DEBUG = env_bool("DEBUG", False)
# DATABASE_URL unset: the embedded PostgreSQL of this checkout (SKIPLOCK_PG_INSTANCE: dev or test).
EMBEDDED_DATABASE = not env_str("DATABASE_URL")


def _secret_key() -> str:
    key = env_secret("SECRET_KEY")
    if key:
        return key
    if not DEBUG and not EMBEDDED_DATABASE:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set and DEBUG is off; set SECRET_KEY (or SECRET_KEY_FILE), "
            "or DEBUG=true for local development"
        )
    # Local development (DEBUG, or this checkout's embedded database, so `manage.py apikey create`
    # works as documented beside `make run`): a random key kept in the git-ignored state folder,
    # so logins survive restarts. Production sets DATABASE_URL, and then SECRET_KEY is required.
    path = STATE_DIR / "secret-key"
    if not path.exists():
        STATE_DIR.mkdir(exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])


def _database_from_url(url: str) -> dict[str, object]:
    """Parse postgresql://user:pass@host:port/name?host=/socket/dir&sslmode=... into DATABASES."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ImproperlyConfigured(f"DATABASE_URL must be a postgresql:// URL, not {parts.scheme!r}://")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ImproperlyConfigured("DATABASE_URL names no database (postgresql://…/<name>)")
    host = query.pop("host", None) or parts.hostname or ""
    port = query.pop("port", None) or (str(parts.port) if parts.port else "")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": host,
        "PORT": port,
        "OPTIONS": query,
        "CONN_MAX_AGE": env_int("CONN_MAX_AGE", 60, minimum=0),
        "CONN_HEALTH_CHECKS": True,
        "TEST": {"NAME": env_str("TEST_DATABASE_NAME", None)},
    }


if EMBEDDED_DATABASE:
    from project.embedded_postgres import EmbeddedPostgres, EmbeddedPostgresError

    _instance = env_str("SKIPLOCK_PG_INSTANCE", "dev") or "dev"
    try:
        DATABASE_URL = EmbeddedPostgres(_instance).url()
    except EmbeddedPostgresError as exc:
        raise ImproperlyConfigured(f"SKIPLOCK_PG_INSTANCE={_instance!r}: {exc}") from None
else:
    DATABASE_URL = env_str("DATABASE_URL") or ""
DATABASES = {"default": _database_from_url(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "procrastinate.contrib.django",
    "ninja",  # /api/docs uses the Swagger UI copy django-ninja ships (no CDN)
    "axes",  # login throttling (admin and pages sign-in)
    "jobs",
]

# Under ASGI (project/asgi.py) the stock classes below are loaded as their project/middleware.py
# variants: the same hooks, run on the event loop instead of one thread hop each.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # turns a locked-out sign-in into its 429 answer
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.csp",  # {{ csp_nonce }} for the rare inline script
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# STATIC_ROOT set (the Docker image sets it and runs collectstatic): WhiteNoise serves the collected,
# compressed files with hashed names (cached forever). Unset (a source checkout): it serves them
# straight from the apps, so running needs no collectstatic step and no empty folder to warn about.
_static_root = env_str("STATIC_ROOT")
STATIC_ROOT: Path | None = Path(_static_root) if _static_root else None
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_ROOT
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = STATIC_ROOT is None
# WhiteNoise streams files with a sync iterator; under ASGI Django iterates it in a thread and warns
# on every file. That is the documented, working path for the few admin/page assets served here.
warnings.filterwarnings("ignore", message="StreamingHttpResponse must consume synchronous iterators")
LOGIN_URL = "/admin/login/"

# Security: secure by default outside DEBUG (check --deploy is clean).
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 3600, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy on every answer: scripts, styles, images and fonts from this site only
# (an inline <script> needs the request's nonce: {{ csp_nonce }}); no plugins, no framing, forms
# post here only. Inline style attributes stay allowed: progress bars set their width, Swagger UI
# styles its own elements; a style cannot run code.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF, CSP.NONCE],
    "style-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:"],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
    "form-action": [CSP.SELF],
}

# Login throttling (django-axes): after SKIPLOCK_LOGIN_FAILURE_LIMIT failed sign-ins for one
# username from one address, that pair is refused (429, logged) for SKIPLOCK_LOGIN_LOCKOUT
# seconds; a successful sign-in resets the count. Operators unlock early in the admin (Axes).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("SKIPLOCK_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = dt.timedelta(seconds=env_int("SKIPLOCK_LOGIN_LOCKOUT", 900, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_COOLOFF_MESSAGE = "Too many failed sign-ins for this account from your address; try again later."

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_choice("LOG_LEVEL", "INFO", _LOG_LEVELS)},
    "loggers": {
        "procrastinate": {"level": env_choice("PROCRASTINATE_LOG_LEVEL", "WARNING", _LOG_LEVELS)},
        "django.db.backends": {"level": "INFO"},
        "axes.apps": {"level": "WARNING"},  # no version banner on every command
    },
}

# --- procrastinate ------------------------------------------------------------------------------
PROCRASTINATE_AUTODISCOVER_MODULE_NAME = "tasks"
# Every worker of this app, `manage.py procrastinate worker` included, records through Skiplock.
PROCRASTINATE_ON_APP_READY = "jobs.recording.install"

# --- Skiplock -----------------------------------------------------------------------------------
SKIPLOCK_RESULT_RETENTION = env_int("SKIPLOCK_RESULT_RETENTION", 7 * 24 * 3600, minimum=60)
SKIPLOCK_PROGRESS_INTERVAL = env_float("SKIPLOCK_PROGRESS_INTERVAL", 0.1, minimum=0.0)
SKIPLOCK_SHUTDOWN_GRACE = env_float("SKIPLOCK_SHUTDOWN_GRACE", 30.0, minimum=0.0)
SKIPLOCK_STALLED_AFTER = env_int("SKIPLOCK_STALLED_AFTER", 300, minimum=1)
SKIPLOCK_HEARTBEAT_INTERVAL = env_float("SKIPLOCK_HEARTBEAT_INTERVAL", 10.0, minimum=0.1)
SKIPLOCK_RUN_WORKER_IN_WEB = env_bool("SKIPLOCK_RUN_WORKER_IN_WEB", False)
SKIPLOCK_WORKER_CONCURRENCY = env_int("SKIPLOCK_WORKER_CONCURRENCY", 4, minimum=1)
SKIPLOCK_MAX_BODY_BYTES = env_int("SKIPLOCK_MAX_BODY_BYTES", 1_000_000, minimum=1024)
SKIPLOCK_ALERT_QUEUE_DEPTH = env_int("SKIPLOCK_ALERT_QUEUE_DEPTH", 1000, minimum=1)
SKIPLOCK_OPEN_HEALTH = env_bool("SKIPLOCK_OPEN_HEALTH", True)
SKIPLOCK_OPEN_METRICS = env_bool("SKIPLOCK_OPEN_METRICS", True)
SKIPLOCK_DOCUMENTS_DIR = env_str("SKIPLOCK_DOCUMENTS_DIR", str(BASE_DIR / "samples"))
DATA_UPLOAD_MAX_MEMORY_SIZE = SKIPLOCK_MAX_BODY_BYTES

# --- Workers and reliability (jobs/worker.py, supervisor.py, maintenance.py, periodic.py) --------
SKIPLOCK_WORKER_PROCESSES = env_int("SKIPLOCK_WORKER_PROCESSES", 1, minimum=1)
SKIPLOCK_MAINTENANCE_CRON = env_str("SKIPLOCK_MAINTENANCE_CRON", "* * * * *") or "* * * * *"
SKIPLOCK_PRUNE_BATCH = env_int("SKIPLOCK_PRUNE_BATCH", 1000, minimum=1)
SKIPLOCK_PRUNE_TIME_BUDGET = env_float("SKIPLOCK_PRUNE_TIME_BUDGET", 30.0, minimum=0.0)
SKIPLOCK_PERIODIC_MAX_DELAY = env_float("SKIPLOCK_PERIODIC_MAX_DELAY", 600.0, minimum=0.0)
SKIPLOCK_FETCH_POLL_INTERVAL = env_float("SKIPLOCK_FETCH_POLL_INTERVAL", 5.0, minimum=0.05)
# Extra modules of tasks every worker imports (e.g. "myapp.jobs"), beside each app's tasks.py.
SKIPLOCK_IMPORT_PATHS = env_list("SKIPLOCK_IMPORT_PATHS", [])

# --- REST API, live events, health and metrics (jobs/api.py, jobs/events.py, jobs/health.py) -----
# Seconds between SSE heartbeat comments on an idle stream.
SKIPLOCK_SSE_HEARTBEAT = env_float("SKIPLOCK_SSE_HEARTBEAT", 15.0, minimum=0.5)
# Event stream limits (jobs/streams.py): seconds between re-checks of a stream's credentials (a
# revoked key or a logout ends it), seconds after which a stream ends and the client reconnects
# with Last-Event-ID, and open streams per API key or user in each web process (429 beyond).
SKIPLOCK_SSE_AUTH_RECHECK = env_float("SKIPLOCK_SSE_AUTH_RECHECK", 30.0, minimum=0.1)
SKIPLOCK_SSE_MAX_DURATION = env_float("SKIPLOCK_SSE_MAX_DURATION", 3600.0, minimum=1.0)
SKIPLOCK_SSE_MAX_STREAMS = env_int("SKIPLOCK_SSE_MAX_STREAMS", 20, minimum=1)
# Connections each web process uses to read job snapshots for its SSE streams (beside one LISTEN).
SKIPLOCK_EVENTS_POOL_SIZE = env_int("SKIPLOCK_EVENTS_POOL_SIZE", 2, minimum=1)
# A worker is live when its heartbeat is more recent than this (readiness, metrics, alerts).
SKIPLOCK_WORKER_LIVE_AFTER = env_float(
    "SKIPLOCK_WORKER_LIVE_AFTER", max(30.0, 3 * SKIPLOCK_HEARTBEAT_INTERVAL), minimum=1.0
)
# Under ASGI each request runs in a thread of its own, so Django's persistent connections are never
# reused there: every request would open (and authenticate) a new PostgreSQL connection. With
# SKIPLOCK_DB_POOL (recommended for the web server) requests share a psycopg pool instead.
SKIPLOCK_DB_POOL = env_bool("SKIPLOCK_DB_POOL", False)
SKIPLOCK_DB_POOL_SIZE = env_int("SKIPLOCK_DB_POOL_SIZE", 10, minimum=1)
if SKIPLOCK_DB_POOL:
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # the pool keeps the connections
    DATABASES["default"]["OPTIONS"] = {
        **DATABASES["default"]["OPTIONS"],  # type: ignore[dict-item]
        "pool": {"min_size": 1, "max_size": SKIPLOCK_DB_POOL_SIZE, "timeout": 10},
    }

# --- Jobs core: Django's tasks framework (django.tasks) runs on Skiplock (jobs/django_tasks.py) ---
# QUEUES empty: a Django task may name any queue. OPTIONS["RETRY"] takes RetryPolicy fields
# (e.g. {"max_retries": 3}); without it a Django task gets one attempt, as with Django's backends.
TASKS = {"default": {"BACKEND": "jobs.django_tasks.SkiplockTaskBackend", "QUEUES": [], "OPTIONS": {}}}

# --- Job pages for end users (jobs/pages.py) ----------------------------------------------------
# Tasks the launcher at / offers, by name (empty: every registered task but Skiplock's own skiplock.*).
SKIPLOCK_PAGES_TASKS = env_list("SKIPLOCK_PAGES_TASKS", [])
