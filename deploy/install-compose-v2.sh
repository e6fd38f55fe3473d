#!/usr/bin/env bash
# Installs Compose v2 (`docker compose`) from Debian's archive, for machines whose Debian
# has only docker-compose 1.29 (bookworm). Debian packages Compose v2 from trixie on
# (package docker-compose 2.x: one static binary, the Docker CLI plugin); this fetches
# that package from the same archive, checks it as apt would (the InRelease file's
# signature with the Debian archive keyring, then the index's and the package's SHA-256),
# and installs only the plugin binary, beside Debian's docker-compose 1.29, which stays.
# scripts/test.sh runs it when `docker compose` is missing, so the compose tests bring
# the stack up under both tools.
#
#   deploy/install-compose-v2.sh            # into /usr/local/lib/docker/cli-plugins (root)
#                                           # or ~/.docker/cli-plugins (anyone else)
# Variables: DEBIAN_MIRROR [http://deb.debian.org/debian], SUITE [trixie],
# PLUGIN_DIR (where the binary goes).
set -euo pipefail

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-trixie}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [ "$(id -u)" -eq 0 ]; then
    PLUGIN_DIR=${PLUGIN_DIR:-/usr/local/lib/docker/cli-plugins}
else
    PLUGIN_DIR=${PLUGIN_DIR:-$HOME/.docker/cli-plugins}
fi
case "$(dpkg --print-architecture)" in
    amd64 | arm64) arch=$(dpkg --print-architecture) ;;
    *) echo "install-compose-v2: no Compose v2 package for $(dpkg --print-architecture)" >&2; exit 69 ;;
esac
for tool in curl gpgv xzcat dpkg-deb sha256sum; do
    command -v "$tool" >/dev/null || { echo "install-compose-v2: $tool is missing" >&2; exit 69; }
done
[ -r "$KEYRING" ] || { echo "install-compose-v2: no $KEYRING (package debian-archive-keyring)" >&2; exit 69; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fetch() { curl -fsS --retry 3 --max-time 300 -o "$2" "$MIRROR/$1"; }

# 1. The suite's InRelease, signed by Debian's archive keys.
fetch "dists/$SUITE/InRelease" "$work/InRelease"
gpgv --keyring "$KEYRING" --output "$work/Release" "$work/InRelease" 2>"$work/gpgv.log" || {
    cat "$work/gpgv.log" >&2
    echo "install-compose-v2: the signature of $SUITE's InRelease does not verify" >&2
    exit 1
}
# 2. The package index, by the hash the signed Release gives it.
index="main/binary-$arch/Packages.xz"
want=$(awk -v f="$index" '/^SHA256:/{on=1; next} /^[A-Za-z]/{on=0} on && $3==f {print $1}' "$work/Release")
[ -n "$want" ] || { echo "install-compose-v2: $index is not in $SUITE's Release" >&2; exit 1; }
fetch "dists/$SUITE/$index" "$work/Packages.xz"
echo "$want  $work/Packages.xz" | sha256sum -c --quiet -
# 3. The docker-compose package, by the hash the index gives it.
# (awk reads to the end: an early exit would break xzcat's pipe and, with pipefail, the script.)
stanza=$(xzcat "$work/Packages.xz" | awk '/^Package: docker-compose$/{on=1} on && /^$/{on=0} on{print}')
file=$(sed -n 's/^Filename: //p' <<<"$stanza")
sum=$(sed -n 's/^SHA256: //p' <<<"$stanza")
version=$(sed -n 's/^Version: //p' <<<"$stanza")
case "$version" in
    2.* | [3-9].*) ;;
    *) echo "install-compose-v2: $SUITE's docker-compose is '$version', not Compose v2" >&2; exit 1 ;;
esac
fetch "$file" "$work/compose.deb"
echo "$sum  $work/compose.deb" | sha256sum -c --quiet -
dpkg-deb -x "$work/compose.deb" "$work/root"
mkdir -p "$PLUGIN_DIR"
install -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-compose" "$PLUGIN_DIR/docker-compose"
echo "install-compose-v2: Compose $version (Debian $SUITE) installed as $PLUGIN_DIR/docker-compose" >&2
docker compose version
