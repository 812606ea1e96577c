# syntax=docker/dockerfile:1
# herald's container image: docker build -t herald .
# Run it with contrib/docker-compose.yml (herald + Redis), or:
#   docker run -d --name herald -v herald-data:/var/lib/herald \
#     -v "$PWD/contrib/docker:/etc/herald:ro" -p 587:587 -p 465:465 \
#     -p 127.0.0.1:8025:8025 herald

FROM rust:1.95-bookworm AS build
# aws-lc-sys builds with cc on x86_64 and aarch64; cmake is its fallback
# on other targets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The caches keep the registry and the build between image builds; the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin herald \
 && install -m 0755 target/release/herald /usr/local/bin/herald

FROM debian:bookworm-slim
# ca-certificates: MTA-STS policies, webhooks, TLS reports and verified
# STARTTLS to MX hosts check certificates against the system's roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10025 herald \
 && useradd --system --uid 10025 --gid herald --home-dir /var/lib/herald --no-create-home \
      --shell /usr/sbin/nologin herald \
 && install -d -o herald -g herald -m 0750 /var/lib/herald \
 && install -d -o root -g herald -m 0750 /etc/herald
COPY --from=build /usr/local/bin/herald /usr/local/bin/herald
COPY --chown=root:herald --chmod=0640 contrib/docker/herald.toml /etc/herald/herald.toml

# The spool (accepted mail: keep it on a volume that outlives the
# container), events log, suppression list, webhook outbox; and the config
# with certificates and DKIM keys.
VOLUME ["/var/lib/herald", "/etc/herald"]
WORKDIR /var/lib/herald
# 25: bounce listener ([bounces] listener); 465, 587: submission;
# 8025: admin API, /healthz and /metrics.
EXPOSE 25 465 587 8025
USER herald
# Ports below 1024 as a non-root user: Docker (20.10 and later) sets
# net.ipv4.ip_unprivileged_port_start=0 in a container's network namespace;
# docker-compose.yml sets it explicitly.

# herald has no HTTP client command and the slim image has no curl: bash's
# /dev/tcp asks the admin API's /healthz (no token needed), which answers
# {"status":"ok"}. The address is [admin] address's port on loopback; the
# admin listener must not be bound to another single address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8025 && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && grep -q '\"status\":\"ok\"' <&3"]

# SIGTERM (docker stop): no new sessions, in-flight transactions finish
# within [server] shutdown_grace (30 s; give docker stop --time more),
# accepted mail stays in the spool.
STOPSIGNAL SIGTERM
ENTRYPOINT ["herald", "--config", "/etc/herald/herald.toml", "serve"]
