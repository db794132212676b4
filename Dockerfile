# syncd: one process, one config file. Mount the config at /etc/syncd/syncd.toml and a
# volume at /var/lib/syncd for the SQLite store (or point store.url at PostgreSQL).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY syncd ./syncd
RUN pip install . && useradd --system --home /var/lib/syncd --create-home syncd

USER syncd
VOLUME ["/var/lib/syncd"]
EXPOSE 8780
HEALTHCHECK --interval=30s --timeout=3s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8780/healthz').status != 200)"
# SIGTERM stops leasing, lets running deliveries finish (delivery.shutdown_grace_seconds), exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncd"]
CMD ["run", "-c", "/etc/syncd/syncd.toml"]
