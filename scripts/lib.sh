# shellcheck shell=bash
# Shared set-up for scripts/run, scripts/test and scripts/bench: packages,
# the build, and private PostgreSQL and Redis servers. Never touches a
# system-wide server: every server here runs from a directory we own, on
# 127.0.0.1 and a port we choose.

PAYMENTD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_USER=paymentd

PACKAGES=(
  build-essential cmake pkg-config git python3 curl clang clang-format libclang-rt-14-dev
  libnng-dev libevent-dev libpq-dev libhiredis-dev libmsgpack-dev libcmocka-dev
  libjansson-dev libcurl4-openssl-dev libssl-dev libsystemd-dev libjwt-dev
  postgresql postgresql-contrib redis-server redis-tools systemd
)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs the packages that are missing (the common list plus any named as
# arguments), without starting their services.
ensure_packages() {
  local missing=() p wanted=("${PACKAGES[@]}" "$@")
  # The Stripe client test runs on Node.js; a machine that has node already keeps it.
  command -v node >/dev/null 2>&1 || wanted+=(nodejs)
  command -v npm >/dev/null 2>&1 || wanted+=(npm)
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}); run as root to install them"
  say "installing ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    # Package scripts must not start system-wide PostgreSQL or Redis.
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=1
  fi
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    mkdir -p /etc/postgresql-common
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf
  fi
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  apt-get -o Dpkg::Options::=--force-confold install -y --no-install-recommends "${missing[@]}" \
    >/tmp/paymentd-apt.log 2>&1 || {
    apt-get update >>/tmp/paymentd-apt.log 2>&1 &&
      apt-get -o Dpkg::Options::=--force-confold install -y --no-install-recommends "${missing[@]}" \
        >>/tmp/paymentd-apt.log 2>&1
  } || rc=$?
  [ $own_policy -eq 1 ] && rm -f "$policy"
  [ $rc -eq 0 ] || { tail -20 /tmp/paymentd-apt.log >&2; die "apt-get install failed"; }
}

pg_bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] || die "PostgreSQL server binaries not found"
  echo "$d"
}

# PostgreSQL refuses to run as root: it runs as a dedicated system user.
ensure_pg_user() {
  id "$PG_USER" >/dev/null 2>&1 && return 0
  [ "$(id -u)" -eq 0 ] || die "user $PG_USER is missing; run as root to create it"
  say "creating system user $PG_USER for the private PostgreSQL"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PG_USER"
}

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

# Checks that the PostgreSQL user can reach a directory.
pg_can_reach() {
  as_pg test -x "$1"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# pg_start DATADIR PORT: initialises DATADIR when empty, starts the server.
pg_start() {
  local data=$1 port=$2 bin
  bin=$(pg_bindir)
  ensure_pg_user
  mkdir -p "$data"
  [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$data"
  chmod 700 "$data"
  pg_can_reach "$data" || die "user $PG_USER cannot reach $data: make its parent directories searchable (chmod o+x)"
  if [ ! -f "$data/PG_VERSION" ]; then
    say "initialising PostgreSQL in $data"
    as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null ||
      die "initdb failed"
  fi
  as_pg "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
    -o "-p $port -k $data -c listen_addresses=127.0.0.1 -c max_connections=300 ${PG_EXTRA_OPTS:-}" start >/dev/null ||
    { tail -20 "$data/server.log" >&2; die "PostgreSQL did not start"; }
}

pg_stop() {
  local data=$1 mode=${2:-fast} bin
  bin=$(pg_bindir)
  [ -f "$data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$data" -m "$mode" -w stop >/dev/null 2>&1
  return 0
}

pg_running() {
  local data=$1 bin
  bin=$(pg_bindir)
  as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1
}

# pg_ensure_db PORT HOSTDIR: the paymentd role and database.
pg_ensure_db() {
  local port=$1 psql
  psql=(psql -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -qAt)
  "${psql[@]}" -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname='paymentd'" | grep -q 1 ||
    "${psql[@]}" -d postgres -c "CREATE ROLE paymentd LOGIN" >/dev/null
  "${psql[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname='paymentd'" | grep -q 1 ||
    "${psql[@]}" -d postgres -c "CREATE DATABASE paymentd OWNER paymentd" >/dev/null
}

# redis_start DIR PORT [persist]
redis_start() {
  local dir=$1 port=$2 persist=${3:-no}
  mkdir -p "$dir"
  local opts=(--port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save "")
  if [ "$persist" = yes ]; then opts+=(--appendonly yes); else opts+=(--appendonly no); fi
  redis-server "${opts[@]}" || die "Redis did not start"
  local i
  for i in $(seq 1 100); do
    redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "Redis did not answer on port $port"
}

redis_stop() {
  local dir=$1 pid
  [ -f "$dir/redis.pid" ] || return 0
  pid=$(cat "$dir/redis.pid")
  kill "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

# build DIR [cmake args...]
build() {
  local dir=$1
  shift
  cmake -S "$PAYMENTD_ROOT" -B "$dir" "$@" >/dev/null || die "cmake configure failed"
  cmake --build "$dir" -j "$(nproc)" || die "build failed"
}

# Installs the test clients of tests/node (the official stripe package).
ensure_node_modules() {
  local dir=$PAYMENTD_ROOT/tests/node
  [ -d "$dir/node_modules/stripe" ] && [ "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ] && return 0
  say "installing the Node.js test clients (npm ci)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || die "npm ci failed in tests/node"
}
