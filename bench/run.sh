#!/usr/bin/env bash
# Benchmarks tftp-offload side by side with tftpd-hpa using the shared anchor harness
# (../shared/bench/run_anchors.py; see its README for the scenarios). Every argument is passed
# through to run_anchors.py and overrides the defaults set here:
#   bench/run.sh --quick                            # smoke test, small files, 1 repeat (~1-2 min)
#   bench/run.sh                                    # the full matrix (~12 min per server)
#   bench/run.sh --scenarios a,b --repeat 3         # a subset
#   bench/run.sh --servers tftpd-hpa,atftpd,dnsmasq # more peers (dnsmasq needs port 69 free)
#   bench/run.sh --servers ''                       # tftp-offload alone
# State (tools, the harness' venv and .deps, results/) goes to $TFTP_BENCH_HOME,
# default build/bench-home; shared/ may be read-only. Needs root (apt, taskstats).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=$(cd "${TFTP_SHARED:-$repo/../shared}" && pwd)
export TFTP_BENCH_HOME=${TFTP_BENCH_HOME:-$repo/build/bench-home}
mkdir -p "$TFTP_BENCH_HOME"

"$repo/scripts/setup"
# The harness' own setup (tftpd-hpa, dnsmasq-base, atftpd unpacked, its tools and venv): once.
if [ ! -e "$TFTP_BENCH_HOME/.setup-done" ]; then
  "$shared/bench/setup.sh"
  touch "$TFTP_BENCH_HOME/.setup-done"
fi

out=""
prev=""
for arg in "$@"; do
  case "$arg" in --out=*) out=${arg#--out=} ;; esac
  [ "$prev" = "--out" ] && out=$arg
  prev=$arg
done
[ -n "$out" ] || out="$TFTP_BENCH_HOME/results/$(date +%Y%m%d-%H%M%S)"

version=$("$repo/.venv/bin/python" -c 'import tftp_offload; print(tftp_offload.__version__)')
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
server="$repo/.venv/bin/twistd -n --pidfile= tftp-offload --quiet --root {root} --listen {hostport} --max-sessions 2000"
# The load generator is one client address: per-client limits off, or they are what is measured.
server="$server --max-sessions-per-client 0 --max-requests-per-second-per-client 0"

python3 "$shared/bench/run_anchors.py" \
  --servers tftpd-hpa \
  --server "tftp-offload=$server" \
  --server-version "tftp-offload=tftp-offload $version ($commit)" \
  --out "$out" \
  "$@"

echo
cat "$out/summary.md"
