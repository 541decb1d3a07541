#!/bin/sh
# What a secured compose stack needs, made by compose's one-shot `secrets` service (as
# root, in the sundara image) before anything else starts. Idempotent: a restart keeps every
# key it made; only the users' list (auth.conf) and Redis' ACL are written again.
#
#   $SECRETS_DIR (volume sundara-secrets, mounted by nats and the validator's services)
#     tls/ca.pem, tls/server.pem               the CA clients pin, nats' certificate
#     tls/ca-key.pem, tls/server-key.pem       root only (nats runs as root; services cannot read them)
#     auth/*.nk, auth/auth.conf                one NKey seed per user (`sundara auth init`), the users
#     validator.secret                         the validator secret of scheduler and verifier
#   $POOL_SECRETS_DIR (volume sundara-pool-secrets, mounted by the validator's own workers)
#     tls/ca.pem, auth/pool.nk                 the CA and the pool's user: nothing else
#   $REDIS_SECRETS_DIR (volume sundara-redis-secrets, mounted by redis)
#     users.acl                                the default user off, user `sundara` with REDIS_PASSWORD
#
# Set by compose from infra/.env: REDIS_PASSWORD (required), NATS_HOSTS (names outside miners
# reach nats at, for its certificate; read when the CA is made, i.e. once), TENANTS
# (default: `default`), MINER_KEYS (`ID=PUBLIC_KEY ...` of outside miners' `sundara auth keygen`),
# CHAIN (1: miners join by hotkey through the `chain` service's auth callout).
# tests/deployment.rs runs this script with the real binary and serves what it made.
set -eu
umask 077

SECRETS_DIR=${SECRETS_DIR:-/secrets}
POOL_SECRETS_DIR=${POOL_SECRETS_DIR:-/pool-secrets}
REDIS_SECRETS_DIR=${REDIS_SECRETS_DIR:-/redis-secrets}
# The image's `sundara` user (infra/Dockerfile).
SERVICE_UID=${SERVICE_UID:-10001}

case "${REDIS_PASSWORD:-}" in
  "" | *[!A-Za-z0-9_-]*)
    echo "secrets: set REDIS_PASSWORD (letters, digits, - and _ only: it goes into URLs), e.g. \$(openssl rand -hex 24)" >&2
    exit 1
    ;;
esac
if [ "${#REDIS_PASSWORD}" -lt 16 ]; then
  echo "secrets: REDIS_PASSWORD must be at least 16 characters" >&2
  exit 1
fi

# TLS: made once. `sundara tls init` refuses to replace a CA (every miner pins it): to
# start over, remove the tls directory and hand out the new ca.pem.
if [ ! -f "$SECRETS_DIR/tls/ca.pem" ]; then
  set -- --host nats
  for host in ${NATS_HOSTS:-}; do
    set -- "$@" --host "$host"
  done
  sundara tls init --dir "$SECRETS_DIR/tls" "$@"
fi

# NATS users: existing seeds are kept, auth.conf lists every user again.
set --
for tenant in ${TENANTS:-default}; do
  set -- "$@" --tenant "$tenant"
done
for key in ${MINER_KEYS:-}; do
  set -- "$@" --miner-key "$key"
done
if [ "${CHAIN:-}" = 1 ]; then
  set -- "$@" --chain
fi
sundara auth init --dir "$SECRETS_DIR/auth" "$@"

# The validator secret (scheduler and verifier read it with SUNDARA_SECRET_FILE): made once.
if [ ! -s "$SECRETS_DIR/validator.secret" ]; then
  python3 -c 'import secrets; print(secrets.token_hex(32))' >"$SECRETS_DIR/validator.secret.new"
  mv "$SECRETS_DIR/validator.secret.new" "$SECRETS_DIR/validator.secret"
fi

# The pool's copy: the CA and pool.nk only.
mkdir -p "$POOL_SECRETS_DIR/tls" "$POOL_SECRETS_DIR/auth"
cp "$SECRETS_DIR/tls/ca.pem" "$POOL_SECRETS_DIR/tls/ca.pem"
cp "$SECRETS_DIR/auth/pool.nk" "$POOL_SECRETS_DIR/auth/pool.nk"

# Redis' users, from REDIS_PASSWORD (the services' SUNDARA_REDIS_URL carries the same).
mkdir -p "$REDIS_SECRETS_DIR"
printf 'user default off\nuser sundara on >%s ~* &* +@all\n' "$REDIS_PASSWORD" >"$REDIS_SECRETS_DIR/users.acl"

# Who reads what: certificates for all, private keys of nats' TLS for root (nats) only,
# seeds and the validator secret for the services' user, Redis' ACL in a volume only
# redis mounts (its server runs as the image's redis user).
chmod 0755 "$SECRETS_DIR" "$SECRETS_DIR/tls" "$POOL_SECRETS_DIR" "$POOL_SECRETS_DIR/tls" "$REDIS_SECRETS_DIR"
chmod 0644 "$SECRETS_DIR/tls/ca.pem" "$SECRETS_DIR/tls/server.pem" "$POOL_SECRETS_DIR/tls/ca.pem" "$REDIS_SECRETS_DIR/users.acl"
chmod 0600 "$SECRETS_DIR/tls/ca-key.pem" "$SECRETS_DIR/tls/server-key.pem" "$SECRETS_DIR/validator.secret"
chmod 0700 "$SECRETS_DIR/auth" "$POOL_SECRETS_DIR/auth"
if [ "$(id -u)" = 0 ]; then
  chown -R "$SERVICE_UID:$SERVICE_UID" "$SECRETS_DIR/auth" "$SECRETS_DIR/validator.secret" "$POOL_SECRETS_DIR/auth"
fi
echo "secrets: ready in $SECRETS_DIR (CA: $SECRETS_DIR/tls/ca.pem)"
