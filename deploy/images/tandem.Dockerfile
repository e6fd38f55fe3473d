# One Tandem service per image: regional-node, replicator or gateway (build arg BINARY).
#
# The binary is built by cargo on the host and copied in; this Dockerfile compiles
# nothing. deploy/build-images.sh stages each binary into a build context of its own
# (that directory is the context, so nothing else is sent to the engine):
#
#   cargo build --release --bins -p regional-node -p replicator -p gateway
#   deploy/build-images.sh                    # all images, tag :local
#
# by hand, for one service:
#   mkdir -p ctx && cp target/release/gateway deploy/images/tandem-healthcheck ctx/
#   docker build -f deploy/images/tandem.Dockerfile --build-arg BINARY=gateway -t tandem-gateway:local ctx
#
# The binaries link against the host's glibc: build them on Debian bookworm (the base
# below) or an older glibc. Plain Dockerfile syntax only: it must build with the legacy
# builder too (Debian's docker.io has no BuildKit client).
FROM debian:bookworm-slim

# ca-certificates: the gateway fetches JWKS and the node delivers webhooks over https.
# Everything else the services need is in the base (libc, libgcc; bash for the
# healthcheck). Shared by the three images: the ARG comes after it so the layer is
# built once.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid tandem --home-dir /var/lib/tandem \
        --shell /usr/sbin/nologin tandem \
    && mkdir -p /var/lib/tandem/gateway \
    && chown -R tandem:tandem /var/lib/tandem
COPY tandem-healthcheck /usr/local/bin/tandem-healthcheck

ARG BINARY
COPY ${BINARY} /usr/local/bin/${BINARY}
# Which binary this image runs: the entrypoint and the healthcheck read it.
ENV TANDEM_SERVICE=${BINARY} \
    LOG_FORMAT=json

USER tandem
WORKDIR /var/lib/tandem
# /var/lib/tandem/gateway exists and belongs to `tandem`, so a fresh named volume
# mounted there (GATEWAY_STATE_DIR) is writable.
# An exec-form ENTRYPOINT cannot expand a variable, so a shell does it and then
# replaces itself with the binary: `docker run IMAGE --help` passes --help to it.
ENTRYPOINT ["/bin/sh", "-c", "exec \"/usr/local/bin/$TANDEM_SERVICE\" \"$@\"", "--"]
# Live = the process answers HTTP on its listen address (from NODE_LISTEN,
# REPLICATOR_LISTEN or GATEWAY_LISTEN).
HEALTHCHECK --interval=2s --timeout=2s --start-period=5s --retries=15 \
    CMD ["/usr/local/bin/tandem-healthcheck"]
