# etcd from Debian's package (bookworm: etcd 3.4), for docker-compose.gateways.yml: the
# consensus store several gateways share failover control through.
#
#   docker build -f deploy/images/etcd.Dockerfile -t tandem-etcd:local deploy/images
#
# Runs as the package's `etcd` user with its data in /var/lib/etcd (a volume in the
# compose file). Plain Dockerfile syntax (legacy builder).
FROM debian:bookworm-slim

# The package's postinst would start a service; the base image's policy-rc.d forbids
# that, so nothing runs during the build. The package creates the `etcd` user; make sure
# of it (and of the data directory's owner, which a new volume copies).
RUN apt-get update \
    && apt-get install -y --no-install-recommends etcd-server \
    && rm -rf /var/lib/apt/lists/* \
    && (id etcd >/dev/null 2>&1 || useradd --system --home-dir /var/lib/etcd --shell /usr/sbin/nologin etcd) \
    && mkdir -p /var/lib/etcd \
    && chown -R etcd:etcd /var/lib/etcd

USER etcd
WORKDIR /var/lib/etcd
EXPOSE 2379
ENTRYPOINT ["/usr/bin/etcd"]
# One member on the container's own address. docker-compose.gateways.yml gives the
# advertised URL its service name. Heartbeat 50 ms / election 500 ms: the minimum lease
# TTL becomes 1 s, which the gateways' controller lease (GATEWAY_ETCD_LEASE_TTL_S=1)
# needs; etcd's defaults would grant 2 s.
CMD ["--name=etcd", "--data-dir=/var/lib/etcd/data", \
     "--listen-client-urls=http://0.0.0.0:2379", "--advertise-client-urls=http://127.0.0.1:2379", \
     "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380", \
     "--initial-cluster=etcd=http://127.0.0.1:2380", \
     "--heartbeat-interval=50", "--election-timeout=500", "--logger=zap", "--log-level=warn"]
# No curl or wget in the image: bash asks /health over /dev/tcp (200 once the member
# has a leader and answers reads).
HEALTHCHECK --interval=2s --timeout=2s --start-period=5s --retries=15 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/2379 && printf 'GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r -t 2 line <&3 && [[ $line == *' 200 '* ]]"]
