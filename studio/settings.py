"""Flow Studio settings: one file, driven by environment variables (see .env.example)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url

from studio.env import env_bool, env_int, env_json, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("STUDIO_DATA_DIR", str(BASE_DIR / "data"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _file_secret(name: str, make: str) -> str:
    """A secret kept in a 0600 file under the data directory, created on first use."""
    path = DATA_DIR / name
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(make)
    return path.read_text().strip()


def _new_fernet_key() -> str:
    import base64

    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


DEBUG = env_bool("STUDIO_DEBUG", False)
PRODUCTION = env_bool("STUDIO_PRODUCTION", False)
SECRET_KEY = env_str("STUDIO_SECRET_KEY") or _file_secret("secret_key", secrets.token_urlsafe(50))
# Fernet keys for connection secrets: the first encrypts, all decrypt (rotation adds a new first key).
# The key file holds one key per line, newest first, once `rotate_encryption_key` has run.
STUDIO_ENCRYPTION_KEYS = (
    env_list("STUDIO_ENCRYPTION_KEYS") or _file_secret("encryption.key", _new_fernet_key()).split()
)

ALLOWED_HOSTS = env_list("STUDIO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("STUDIO_CSRF_TRUSTED_ORIGINS", [])
# Where `manage.py runstudio` binds daphne; the public URL (printed links) follows unless set.
STUDIO_HOST = env_str("STUDIO_HOST", "127.0.0.1")
STUDIO_PORT = env_int("STUDIO_PORT", 8000, minimum=1)
_shown_host = "127.0.0.1" if STUDIO_HOST in ("0.0.0.0", "::", "") else STUDIO_HOST
STUDIO_PUBLIC_URL = env_str("STUDIO_PUBLIC_URL", f"http://{_shown_host}:{STUDIO_PORT}").rstrip("/")
# How long the first-user setup link printed by runstudio stays valid.
STUDIO_SETUP_TOKEN_HOURS = env_int("STUDIO_SETUP_TOKEN_HOURS", 24, minimum=1)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "channels",
    "accounts_app",
    "flows_app",
    "runs_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "accounts_app.middleware.HtmxLoginRedirectMiddleware",
]

ROOT_URLCONF = "studio.urls"
ASGI_APPLICATION = "studio.asgi.application"
WSGI_APPLICATION = None

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
                "studio.context_processors.navigation",
            ],
        },
    },
]

_default_db = f"sqlite:///{DATA_DIR / 'studio.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL", _default_db), conn_max_age=0)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the workers write the same file: WAL lets readers go on while one writes, and
    # IMMEDIATE transactions take the write lock up front instead of failing on upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Test databases live in a file so that worker processes started by the tests can open them too.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-studio.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
# WhiteNoise warns on every start when the folder is missing, before collectstatic ever ran.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not PRODUCTION

# Redis, when configured, carries the channel layer and Celery results; otherwise nothing needs a server.
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    # A second SQLite file carries the channel layer between daphne and the workers, so the embedded
    # default pushes events across processes with no server.
    DATABASES["channels"] = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(DATA_DIR / "channels.sqlite3"),
        "OPTIONS": {"timeout": 30, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"},
        "TEST": {"NAME": str(DATA_DIR / "test-channels.sqlite3")},
    }
    DATABASE_ROUTERS = ["channels_lite.router.ChannelsRouter"]
    INSTALLED_APPS.append("channels_lite")
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_lite.layers.core.SQLiteChannelLayer",
            "CONFIG": {"database": "channels", "expiry": 60, "capacity": 1000},
        }
    }

_broker_dir = DATA_DIR / "broker"
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT = "studio.broker:FilesystemTransport"
    for sub in ("queue", "processed", "control"):
        (_broker_dir / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        # The file transport polls its folder; kombu's default second adds that much latency to every task, and
        # the messages of chunks an execution took on (see runs_app.services._claim_next) pass at this pace, one
        # per pool process per look: at 50 ms, the 14 such messages a 2,000-line run leaves kept the next run
        # from starting for 0.3 s. An idle worker's looks cost it about 2% of a core.
        "polling_interval": 0.01,
    }
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND") or (
    REDIS_URL or f"file://{(DATA_DIR / 'celery-results').as_posix()}"
)
if CELERY_RESULT_BACKEND.startswith("file://"):
    # Celery's file backend refuses to start unless its folder exists.
    Path(CELERY_RESULT_BACKEND.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXPIRES = 3600
CELERY_WORKER_CONCURRENCY = env_int("STUDIO_WORKER_CONCURRENCY", 2, minimum=1)
# A pool process killed mid-chunk is noticed after this many seconds and its task redelivered.
CELERY_WORKER_LOST_WAIT = 2.0
# A worker waits for its broker as long as it takes (at start and after a broker restart) instead of exiting.
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
# Chunks that run when the broker connection drops keep running: their results go to the database, not the
# broker. Cancelling them would only leave them to the reaper once their heartbeat is stale.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False

# Batch runs: lines in flight per run, and the heartbeat / reaper timings of chunks.
STUDIO_RUN_CONCURRENCY = env_int("STUDIO_RUN_CONCURRENCY", 32, minimum=1)
STUDIO_RUN_HEARTBEAT_SECONDS = env_int("STUDIO_RUN_HEARTBEAT_SECONDS", 2, minimum=1)
STUDIO_RUN_STALE_SECONDS = env_int("STUDIO_RUN_STALE_SECONDS", 30, minimum=2)
STUDIO_RUN_REQUEUE_SECONDS = env_int("STUDIO_RUN_REQUEUE_SECONDS", 300, minimum=10)
STUDIO_RUN_REAPER_SECONDS = env_int("STUDIO_RUN_REAPER_SECONDS", 15, minimum=1)

# Runner processes: flow code runs there, never in the web server or a worker.
STUDIO_RUNNER_MEMORY_MB = env_int("STUDIO_RUNNER_MEMORY_MB", 1024, minimum=64)
STUDIO_RUNNER_CPU_SECONDS = env_int("STUDIO_RUNNER_CPU_SECONDS", 600, minimum=1)
STUDIO_RUNNER_TIMEOUT_SECONDS = env_int("STUDIO_RUNNER_TIMEOUT_SECONDS", 600, minimum=1)

# Security: strict in production; plain HTTP on localhost otherwise.
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("STUDIO_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("STUDIO_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOG_LEVEL = env_str("STUDIO_LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# Zip import limits (flows_app.services.zip_read_checked): total uncompressed bytes, entries, and the
# compression ratio above which an entry counts as a zip bomb.
STUDIO_ZIP_MAX_BYTES = env_int("STUDIO_ZIP_MAX_BYTES", 50 * 1024 * 1024, minimum=1024)
STUDIO_ZIP_MAX_FILES = env_int("STUDIO_ZIP_MAX_FILES", 5000, minimum=1)
STUDIO_ZIP_MAX_RATIO = env_int("STUDIO_ZIP_MAX_RATIO", 100, minimum=1)

# Prices per million tokens by model, for the cost columns of run comparisons:
# {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}. Without a price, comparisons show tokens only.
STUDIO_MODEL_PRICES = env_json("STUDIO_MODEL_PRICES", {})
