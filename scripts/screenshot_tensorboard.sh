#!/usr/bin/env bash
# Screenshots of TensorBoard's dashboards for a log directory, to look at what users will see.
#
#   scripts/screenshot_tensorboard.sh LOGDIR OUTDIR [WIDTHxHEIGHT]
#
# Starts TensorBoard on a free port bound to 127.0.0.1 only, waits until it answers and has loaded the runs,
# shoots scalars, custom_scalars, histograms, images and text with headless Chromium (OUTDIR/<dashboard>.png),
# and stops TensorBoard again (also on error or Ctrl-C). Needs `tensorboard`, `chromium` (or $CHROMIUM) and curl.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 LOGDIR OUTDIR [WIDTHxHEIGHT]   (e.g. $0 runs/nlp /tmp/shots 1600x1200)" >&2
  exit 2
fi
logdir=$1
outdir=$2
size=${3:-1600x1200}
chromium=${CHROMIUM:-chromium}
if [[ ! -d $logdir ]]; then
  echo "$0: log directory $logdir does not exist" >&2
  exit 2
fi
command -v tensorboard >/dev/null || { echo "$0: tensorboard is not on PATH (pip install tensorboard)" >&2; exit 2; }
command -v "$chromium" >/dev/null || { echo "$0: $chromium not found; set CHROMIUM=/path/to/chrome" >&2; exit 2; }
mkdir -p "$outdir"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
tb_pid=""
cleanup() {
  if [[ -n $tb_pid ]] && kill -0 "$tb_pid" 2>/dev/null; then
    kill "$tb_pid" 2>/dev/null || true
    wait "$tb_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

tensorboard --logdir "$logdir" --host 127.0.0.1 --port "$port" --load_fast=false --reload_interval 2 \
  >"$work/tensorboard.log" 2>&1 &
tb_pid=$!
url="http://127.0.0.1:$port"

# Wait until it answers and lists at least one run (the first reload of the event files can take a while).
for _ in $(seq 1 120); do
  if ! kill -0 "$tb_pid" 2>/dev/null; then
    echo "$0: tensorboard exited early:" >&2
    cat "$work/tensorboard.log" >&2
    exit 1
  fi
  runs=$(curl -sf "$url/data/runs" 2>/dev/null || true)
  if [[ -n $runs && $runs != "[]" ]]; then
    break
  fi
  sleep 0.5
done
if [[ -z ${runs:-} || $runs == "[]" ]]; then
  echo "$0: tensorboard at $url found no runs under $logdir after 60 s" >&2
  exit 1
fi
sleep 2  # let the multiplexer finish loading every tag of every run

for dashboard in scalars custom_scalars histograms images text; do
  "$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/chrome-$dashboard" --window-size="${size/x/,}" --virtual-time-budget=15000 \
    --hide-scrollbars --screenshot="$outdir/$dashboard.png" "$url/#$dashboard" >/dev/null 2>&1 || {
      echo "$0: chromium failed on #$dashboard" >&2
      exit 1
    }
  echo "$outdir/$dashboard.png"
done
