# marketflow service image: `docker compose up` runs it with PostgreSQL, Redis and three feeds.

# The dashboard's chart library, from the npm registry at the version package-lock.json pins.
FROM node:20-slim AS dashboard
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

FROM python:3.13-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sql ./sql
COPY marketflow ./marketflow
COPY --from=dashboard /build/node_modules/lightweight-charts/dist/lightweight-charts.standalone.production.mjs \
     ./marketflow/dashboard/vendor/lightweight-charts.mjs
COPY --from=dashboard /build/node_modules/lightweight-charts/LICENSE ./marketflow/dashboard/vendor/LICENSE
RUN pip install --no-cache-dir . && useradd --system --home /app marketflow \
    && mkdir -p /app/data && chown marketflow /app/data
USER marketflow
EXPOSE 8080
ENTRYPOINT ["marketflow"]
