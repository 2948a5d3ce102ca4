# marketflow service image: `docker compose up` runs it with PostgreSQL, Redis and three feeds.
FROM python:3.13-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY marketflow ./marketflow
RUN pip install --no-cache-dir . && useradd --system --home /app marketflow \
    && mkdir -p /app/data && chown marketflow /app/data
USER marketflow
EXPOSE 8080
ENTRYPOINT ["marketflow"]
