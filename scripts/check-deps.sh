#!/usr/bin/env bash
# Each library crate stays light for its audience: a service that only
# writes events must not build librdkafka, and a module that consumes must
# not pull in the relay's exporter, configuration loader or CLI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Normal (non-dev, non-build) dependencies of a package, one name per line.
deps() {
  cargo tree -q -p "$1" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u
}

# forbid PACKAGE CRATE...: fails naming every forbidden crate found.
forbid() {
  local package=$1; shift
  local tree found=()
  tree=$(deps "$package")
  for crate in "$@"; do
    if grep -qx -- "$crate" <<<"$tree"; then
      found+=("$crate")
    fi
  done
  if ((${#found[@]})); then
    echo "check-deps: $package depends on ${found[*]} (see: cargo tree -p $package -i ${found[0]})" >&2
    return 1
  fi
  echo "check-deps: $package: $(wc -l <<<"$tree") crates, none of: $*"
}

status=0
forbid outbox-model rdkafka rdkafka-sys sqlx tokio metrics figment clap || status=1
forbid outbox-writer rdkafka rdkafka-sys metrics metrics-exporter-prometheus figment clap outbox-consumer outbox-relay || status=1
forbid outbox-consumer metrics-exporter-prometheus figment clap outbox-relay || status=1

# The check itself must be able to fail: the daemon does link librdkafka.
if forbid outbox-relay rdkafka-sys >/dev/null 2>&1; then
  echo "check-deps: the check found no rdkafka-sys under outbox-relay; it is broken" >&2
  status=1
fi
exit $status
