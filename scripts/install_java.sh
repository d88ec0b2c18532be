#!/usr/bin/env bash
# Installs a Java runtime from Debian for the caption metrics: pycocoevalcap runs METEOR 1.5 and the
# PTB tokenizer as Java programs (shared/EVAL.md 6). Idempotent; does nothing when `java` runs.
# Needs root and apt-get; without them the METEOR/CIDEr tests fail (CI installs as root).
set -euo pipefail
if command -v java >/dev/null && java -version >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install_java.sh: cannot install a JRE (needs root and apt-get); METEOR and the PTB tokenizer need java" >&2
    [[ "${CI:-}" == true ]] && exit 1
    exit 0
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# the man-page directory is missing in slim images and the JRE's postinst writes there
mkdir -p /usr/share/man/man1
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends default-jre-headless; } </dev/null >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_java.sh: apt-get failed installing default-jre-headless" >&2
    exit 1
fi
echo "install_java.sh: installed $(java -version 2>&1 | head -1)"
