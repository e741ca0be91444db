#!/usr/bin/env bash
# Builds the repository's Dockerfile, unchanged, with podman on a machine that
# cannot pull base images: the images the Dockerfile names are made locally.
#   scripts/image.sh bases    # debian:bookworm-slim (debootstrap) and rust:<ver>-bookworm
#   scripts/image.sh build    # bases, then `podman build` of the Dockerfile -> outbox-relay:test
#   scripts/image.sh run ARGS...      # podman run with this host's settings (runc, ulimits, host network)
#   scripts/image.sh podman ARGS...   # podman with runtime runc
#
# Host settings (see docs/operations.md, "Container image"): runtime runc,
# explicit ulimits, --network=host, --pull=never. debootstrap uses the Debian
# mirror of this machine's apt configuration.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=image
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"

IMAGE="${OUTBOX_IMAGE:-localhost/outbox-relay:test}"
BASE=debian:bookworm-slim
RUST_VERSION="$(sed -n 's/^FROM rust:\([0-9.]*\)-bookworm.*/\1/p' "$REPO/Dockerfile" | head -n1)"
[[ -n "$RUST_VERSION" ]] || die "cannot read the builder image (FROM rust:<version>-bookworm) from the Dockerfile"
BUILDER="rust:$RUST_VERSION-bookworm"
WORK="$OUTBOX_STATE_DIR/image"

# nofile at most the host's hard limit; nproc at most 32768.
hard_nofile="$(ulimit -Hn)"
[[ "$hard_nofile" == unlimited ]] && hard_nofile=1048576
nofile=$(( hard_nofile < 65536 ? hard_nofile : 65536 ))
PODMAN_RUN_OPTS=(--runtime runc --network=host --ulimit "nofile=$nofile:$nofile" --ulimit nproc=32768:32768)

pm() { podman --runtime runc "$@"; }

# The Debian mirror apt uses here: deb822 .sources files or sources.list lines.
debian_mirror() {
  local f uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    uri="$(awk '
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") s = 1 }
      /^$/ { if (u != "" && s && !done) { print u; done = 1 } u = ""; s = 0 }
      END { if (u != "" && s && !done) print u }' "$f")"
    [[ -n "$uri" ]] && break
  done
  if [[ -z "$uri" && -r /etc/apt/sources.list ]]; then
    uri="$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)"
  fi
  [[ -n "$uri" ]] || die "no bookworm mirror in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources"
  echo "$uri"
}

build_base() {
  if pm image exists "$BASE"; then
    log "$BASE exists"
    return 0
  fi
  need_cmd debootstrap "run scripts/deps.sh (apt-get install debootstrap)"
  local mirror rootfs="$WORK/rootfs" t0
  mirror="$(debian_mirror)"
  t0=$(now_ms)
  rm -rf "$rootfs"
  mkdir -p "$WORK"
  log "debootstrap --variant=minbase bookworm into $rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
    { show_log_tail "$WORK/debootstrap.log"; die "debootstrap failed; see $WORK/debootstrap.log"; }
  # Like the official slim image: no apt caches, no docs.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
  tar -C "$rootfs" -c . | pm import --change 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"
  log "$BASE imported in $(( ($(now_ms) - t0) / 1000 ))s"
}

# rust:<version>-bookworm: the base plus a C toolchain and this machine's
# Rust toolchain (rustc, cargo, the standard library; no docs or sources).
build_builder() {
  if pm image exists "$BUILDER"; then
    log "$BUILDER exists"
    return 0
  fi
  need_cmd rustc "install the Rust toolchain $RUST_VERSION"
  local have sysroot ctx="$WORK/builder" t0
  have="$(rustc --version | awk '{print $2}')"
  [[ "$have" == "$RUST_VERSION"* ]] ||
    die "the Dockerfile builds with Rust $RUST_VERSION but this machine's rustc is $have; install $RUST_VERSION (rustup toolchain install $RUST_VERSION)"
  sysroot="$(rustc --print sysroot)"
  t0=$(now_ms)
  rm -rf "$ctx"
  mkdir -p "$ctx/rust/bin" "$ctx/rust/lib/rustlib/x86_64-unknown-linux-gnu"
  cp -a "$sysroot/bin/rustc" "$sysroot/bin/cargo" "$ctx/rust/bin/"
  cp -a "$sysroot"/lib/*.so* "$ctx/rust/lib/"
  cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu/lib" "$ctx/rust/lib/rustlib/x86_64-unknown-linux-gnu/"
  [[ -d "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu/bin" ]] &&
    cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu/bin" "$ctx/rust/lib/rustlib/x86_64-unknown-linux-gnu/"
  # This machine's own CAs (a site CA in front of the package registries,
  # say) are trusted in the builder as they are here, so cargo can fetch.
  mkdir -p "$ctx/local-ca"
  cp -a /usr/local/share/ca-certificates/. "$ctx/local-ca/" 2>/dev/null || true
  cat >"$ctx/Containerfile" <<EOF
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc g++ make libc6-dev git \\
    && rm -rf /var/lib/apt/lists/*
COPY local-ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY rust/ /usr/local/
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/bin:/usr/bin:/bin
RUN mkdir -p /usr/local/cargo/bin && rustc --version && cargo --version
EOF
  log "building $BUILDER from $BASE and rustc $have"
  pm build "${PODMAN_RUN_OPTS[@]}" --pull=never -t "$BUILDER" "$ctx" >"$WORK/builder.log" 2>&1 ||
    { show_log_tail "$WORK/builder.log"; die "building $BUILDER failed; see $WORK/builder.log"; }
  rm -rf "$ctx"
  log "$BUILDER built in $(( ($(now_ms) - t0) / 1000 ))s"
}

build_image() {
  local t0
  t0=$(now_ms)
  log "podman build of $REPO/Dockerfile -> $IMAGE (log: $WORK/build.log)"
  mkdir -p "$WORK"
  pm build "${PODMAN_RUN_OPTS[@]}" --pull=never -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO" \
    >"$WORK/build.log" 2>&1 ||
    { show_log_tail "$WORK/build.log" 60; die "podman build failed; see $WORK/build.log"; }
  log "$IMAGE built in $(( ($(now_ms) - t0) / 1000 ))s, $(pm image inspect --format '{{.Size}}' "$IMAGE") bytes"
}

[[ $# -ge 1 ]] || { sed -n '2,6p' "$0" >&2; exit 2; }
cmd="$1"
shift
case "$cmd" in
  bases) build_base; build_builder ;;
  build) build_base; build_builder; build_image ;;
  run) pm run "${PODMAN_RUN_OPTS[@]}" "$@" ;;
  podman) pm "$@" ;;
  *) sed -n '2,6p' "$0" >&2; exit 2 ;;
esac
