# Build stage: a release binary (migrations are embedded at compile time).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin iothub \
    && cp target/release/iothub /usr/local/bin/iothub

# Runtime stage: the binary alone, as an unprivileged user. It needs DATABASE_URL (see compose.yaml).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/iothub iothub
COPY --from=build /usr/local/bin/iothub /usr/local/bin/iothub
USER iothub
WORKDIR /var/lib/iothub
ENV IOTHUB_LISTEN=0.0.0.0:8080
EXPOSE 8080 8443
ENTRYPOINT ["iothub", "serve"]
