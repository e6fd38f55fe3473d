#!/usr/bin/env bash
# Makes the .env that docker-compose.yml needs, once: random admin tokens, the key ring
# for personal data and the Grafana admin password, readable by the owner only.
# docker-compose.yml refuses to start without the tokens (there are no default
# tokens). An existing .env is never touched, so the tokens stay what clients and
# scripts already use (add TANDEM_PII_KEYS to an older one by hand).
#
#   deploy/init-env.sh              # writes ./.env next to docker-compose.yml
#   deploy/init-env.sh --print      # also prints the values
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_FILE=$PWD/.env
print=""
case "${1:-}" in
    --print) print=1 ;;
    "") ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "init-env: unknown argument '$1'" >&2; exit 64 ;;
esac

if [ -e "$ENV_FILE" ]; then
    echo "init-env: $ENV_FILE exists; left as it is" >&2
else
    secret() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
    umask 077
    cat >"$ENV_FILE" <<ENV
# Made by deploy/init-env.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Secrets: keep this file private
# (it is in .gitignore). docker compose / docker-compose read it from this directory.
COMPOSE_PROJECT_NAME=tandem
# The gateway's admin API (POST /gateway/failover, drain): Authorization: Bearer <this>
TANDEM_ADMIN_TOKEN=$(secret)
# What the gateway sends to the nodes' /admin/* (lease, promote); the nodes check it.
TANDEM_NODE_TOKEN=$(secret)
# The key ring both regions seal payment tokens and addresses with (NODE_PII_KEYS):
# put a new kid:key first to rotate, keep the old one after it.
TANDEM_PII_KEYS=k$(date -u +%Y%m%d):$(head -c 32 /dev/urandom | base64 -w0)
# Grafana's admin user (only with --profile grafana).
GRAFANA_ADMIN_PASSWORD=$(secret)
ENV
    echo "init-env: wrote new tokens to $ENV_FILE (mode 600)" >&2
fi
if [ -n "$print" ]; then
    grep -E '^(TANDEM_|GRAFANA_)' "$ENV_FILE"
fi
