# Prometheus (and promtool) from Debian's package (bookworm: Prometheus 2.42), for
# docker-compose.yml, which mounts deploy/prometheus/ over /etc/prometheus.
#
#   docker build -f deploy/images/prometheus.Dockerfile -t tandem-prometheus:local deploy/images
#
# Runs as the package's `prometheus` user; the TSDB lives in /var/lib/prometheus (a
# volume in docker-compose.yml). Plain Dockerfile syntax (legacy builder).
FROM debian:bookworm-slim

# --no-install-recommends leaves out prometheus-node-exporter (host metrics of a
# container are not this image's business). The web UI loads one file of
# libjs-moment-timezone, whose package is 214 MB of data builds: dpkg keeps that file only.
RUN printf '%s\n' \
        'path-exclude /usr/share/javascript/moment-timezone/*' \
        'path-include /usr/share/javascript/moment-timezone/moment-timezone-with-data.min.js' \
        'path-exclude /usr/share/nodejs/*' \
        > /etc/dpkg/dpkg.cfg.d/tandem-prometheus-ui \
    && apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/prometheus/metrics2 \
    && chown -R prometheus:prometheus /var/lib/prometheus

USER prometheus
WORKDIR /var/lib/prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
# No --web.enable-lifecycle and no --web.enable-admin-api: nobody who reaches the port
# may stop Prometheus or delete its data.
CMD ["--config.file=/etc/prometheus/prometheus.yml", \
     "--storage.tsdb.path=/var/lib/prometheus/metrics2"]
# No curl or wget in the image: bash asks /-/healthy over /dev/tcp.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=10 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/healthy HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r -t 2 line <&3 && [[ $line == *' 200 '* ]]"]
