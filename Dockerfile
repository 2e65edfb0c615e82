FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY rules ./rules
COPY config.toml ./
RUN pip install --no-cache-dir .
EXPOSE 6432
# point --upstream (or config.toml's [server] upstream) at your PostgreSQL server
ENTRYPOINT ["pgfront", "serve", "--config", "/app/config.toml", "--listen", "0.0.0.0:6432"]
