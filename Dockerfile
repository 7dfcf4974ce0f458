# The hub as a container image: `docker build -t iothub .` (or `docker compose up --build`, see compose.yaml).
#
# Stages:
#   build     compiles the release binary with the Rust toolchain image (migrations are embedded in it).
#   runtime   everything the image is, except the binary: a Debian 12 slim base, an unprivileged user, the
#             ports, volumes, health check and stop signal.
#   prebuilt  `runtime` with a binary built outside, from a named build context `dist` holding `iothub`:
#             `docker buildx build --build-context dist=target/release --target prebuilt .` (CI builds its image
#             this way, from the binary it has just tested; see .ci/container). The binary must be linked
#             against Debian 12's glibc (built on Debian 12, or an older glibc).
#   image     (the default) `runtime` with the binary from `build`.
# Builders that skip the stages a target does not need (BuildKit, Docker's default, and podman/buildah) build
# `image` without `dist`, and `prebuilt` without the Rust toolchain image.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin iothub \
    && cp target/release/iothub /usr/local/bin/iothub

FROM debian:bookworm-slim AS runtime
# No packages are added: the binary needs only glibc (TLS is rustls, with its own roots for the CLI's client).
# A numeric user, so that orchestrators can verify it is not root (Kubernetes' runAsNonRoot).
RUN useradd --uid 10001 --user-group --home-dir /var/lib/iothub --no-create-home \
        --shell /usr/sbin/nologin iothub \
    && mkdir -p /var/lib/iothub/data /etc/iothub/tls \
    && chown -R 10001:10001 /var/lib/iothub
# Plain HTTP and MQTT over TLS on every interface of the container; HTTPS is opt-in (IOTHUB_TLS_LISTEN=0.0.0.0:8443).
# TLS listeners present the hub's local CA's certificate (made in the data volume; `iothub ca` prints the CA) unless
# IOTHUB_TLS_CERT and IOTHUB_TLS_KEY name files mounted in the TLS volume: naming them here would stop a hub that has
# none from starting. Without DATABASE_URL the hub would run its own PostgreSQL, which this image does not contain:
# set DATABASE_URL (compose.yaml does).
ENV IOTHUB_LISTEN=0.0.0.0:8080 \
    IOTHUB_MQTTS_LISTEN=0.0.0.0:8883 \
    IOTHUB_DATA_DIR=/var/lib/iothub/data
USER 10001:10001
WORKDIR /var/lib/iothub
# The hub's own files, and the TLS certificate chain and key.
VOLUME ["/var/lib/iothub/data", "/etc/iothub/tls"]
# HTTP, HTTPS, and MQTT over TLS (IoT Hub's port 8883).
EXPOSE 8080 8443 8883
# SIGTERM: listeners stop accepting, requests in flight finish (long polls end early), then the process exits 0.
STOPSIGNAL SIGTERM
# The image has no curl: the binary itself asks /health/ready on the plain HTTP listener (IOTHUB_LISTEN) and exits
# 0 when the hub and its database answer, 1 otherwise.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["iothub", "health"]
ENTRYPOINT ["iothub"]
CMD ["serve"]

FROM runtime AS prebuilt
COPY --from=dist --chmod=0755 iothub /usr/local/bin/iothub

FROM runtime AS image
COPY --from=build /usr/local/bin/iothub /usr/local/bin/iothub
