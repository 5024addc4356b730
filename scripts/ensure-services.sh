#!/usr/bin/env bash
# Make sure the services the test suite talks to are reachable on 127.0.0.1:
# Redis (6379) and PostgreSQL (5432, database `test`), and the system tools
# some tests drive (promtool). Starts what is installed but down; installs
# what is missing when running as root (CI machines), else says how.
set -u

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 6379; then
  if command -v redis-server >/dev/null; then
    echo "starting redis-server"
    redis-server --daemonize yes --port 6379 --save "" --appendonly no >/dev/null
  else
    echo "redis-server is not installed (apt-get install -y redis-server)" >&2
  fi
fi

if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting postgresql"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  else
    echo "postgresql is not installed (apt-get install -y postgresql)" >&2
  fi
fi

if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing promtool (Debian package prometheus)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
      >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1) \
      || echo "could not install prometheus (promtool)" >&2
  fi
fi

# Browser tests drive Debian's chromium with Playwright (never a browser download);
# a CJK font makes Chinese text render in the screenshots.
if ! command -v chromium >/dev/null || ! fc-list 2>/dev/null | grep -qi "wenquanyi\|noto sans cjk"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
      fonts-wqy-microhei >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
      fonts-wqy-microhei >/dev/null 2>&1) || echo "could not install chromium" >&2
  fi
fi

for i in $(seq 1 30); do
  port_open 6379 && port_open 5432 && exit 0
  sleep 0.5
done
port_open 6379 || echo "warning: Redis is not reachable on 127.0.0.1:6379" >&2
port_open 5432 || echo "warning: PostgreSQL is not reachable on 127.0.0.1:5432" >&2
exit 0
