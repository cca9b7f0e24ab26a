# llm-proxy: gunicorn serving the Flask app as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PORT=3000
WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY *.py schema.sql seed.sql ./
COPY static ./static

RUN useradd --system --uid 10001 --home-dir /app llmproxy && mkdir -p /data && chown llmproxy /data
USER llmproxy

# SQLite by default (in the /data volume); set DATABASE_URL for PostgreSQL.
ENV DATABASE_URL=sqlite:////data/llm-proxy.db
VOLUME ["/data"]
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health', timeout=2)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
