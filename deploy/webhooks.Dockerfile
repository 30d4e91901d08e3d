# The webhook receiver (`apione-dlt webhooks serve`) in a container.
#
#   docker build -f deploy/webhooks.Dockerfile -t apione-webhooks .
#   docker run -p 8080:8080 -e SOURCES__APIONE__WEBHOOK_SECRET=whsec_... \
#       -e SOURCES__APIONE__WEBHOOK_STORE=s3://bucket/apione-deliveries apione-webhooks
#
# The store must be what the pipeline runs read (webhook_store): a bucket (install the
# fsspec driver, e.g. s3fs or gcsfs) or a volume mounted in both. Put it behind HTTPS.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY apione_source ./apione_source
RUN pip install --no-cache-dir ".[webhooks]" \
    && useradd --system --uid 10001 apione \
    && mkdir -p /data/deliveries && chown apione /data/deliveries

USER apione
ENV SOURCES__APIONE__WEBHOOK_STORE=/data/deliveries \
    RUNTIME__DLTHUB_TELEMETRY=false
VOLUME ["/data/deliveries"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
CMD ["apione-dlt", "webhooks", "serve", "--host", "0.0.0.0", "--port", "8080"]
