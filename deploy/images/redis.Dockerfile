# Redis from Debian's package (bookworm: Redis 7.0), for docker-compose.yml.
#
#   docker build -f deploy/images/redis.Dockerfile -t tandem-redis:local deploy/images
#
# The package creates the `redis` user; the server runs as that user with its data in
# /data (a volume in docker-compose.yml). Plain Dockerfile syntax (legacy builder).
FROM debian:bookworm-slim

# The package's postinst would start a service; the base image's policy-rc.d forbids
# that (as in Debian's official images), so nothing runs during the build.
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown redis:redis /data

USER redis
WORKDIR /data
EXPOSE 6379
# Defaults for a private container network: listen on every interface of the container
# (it is never published; docker-compose.yml keeps it on the region's networks) without
# protected mode, which would refuse every client not on loopback. AOF with an fsync
# every second: a killed or restarted server keeps what it acknowledged.
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data", \
     "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
# redis-cli exits 0 on an error reply (e.g. LOADING while it reads the AOF): look for PONG.
HEALTHCHECK --interval=2s --timeout=2s --start-period=5s --retries=15 \
    CMD ["/bin/sh", "-c", "redis-cli -p 6379 ping | grep -qx PONG"]
