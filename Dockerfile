# Skiplock: one image for web, worker and migrations (docker-compose.yml runs all three).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH="/app/.venv/bin:$PATH" \
    STATIC_ROOT=/app/staticfiles

RUN pip install --no-cache-dir 'uv>=0.9,<1' \
 && useradd --system --create-home --home-dir /home/skiplock --shell /usr/sbin/nologin skiplock

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lockfile changes.
COPY pyproject.toml uv.lock .python-version ./
RUN uv sync --frozen --no-dev --no-install-project

COPY . ./
RUN uv sync --frozen --no-dev \
 && DEBUG=false SECRET_KEY=collectstatic-only DATABASE_URL=postgresql://build@localhost/build \
    python manage.py collectstatic --noinput -v 0

USER skiplock
EXPOSE 8000
ENV BIND=0.0.0.0:8000
CMD ["gunicorn", "-c", "project/gunicorn.conf.py", "project.asgi:application"]
