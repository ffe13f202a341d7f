#!/usr/bin/env bash
# make run: the service on its embedded broker, fed by a modest synthetic stream.
# Ctrl-C stops everything.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PORT=${AGG_WEB_PORT:-8080}
export AGG_WEB_PORT=$PORT
export AGG_DATA_DIR=${AGG_DATA_DIR:-./var/demo}
export AGG_WINDOW_SECONDS=${AGG_WINDOW_SECONDS:-60}
export AGG_LOG_LEVEL=${AGG_LOG_LEVEL:-WARNING}
export AGG_AGGREGATES=${AGG_AGGREGATES:-true}  # unique users and the top page in the table
rm -rf "$AGG_DATA_DIR" && mkdir -p "$AGG_DATA_DIR"
$PY -m aggregator run --print-snapshots &
SVC=$!
GEN=
cleanup() { [ -n "$GEN" ] && kill "$GEN" 2>/dev/null; kill -TERM "$SVC" 2>/dev/null; wait "$SVC" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for _ in $(seq 1 120); do
  if curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SVC" 2>/dev/null; then echo "service failed to start" >&2; exit 1; fi
  sleep 0.5
done
echo
echo "service ready: http://127.0.0.1:$PORT/metrics  http://127.0.0.1:$PORT/v1/snapshots"
echo "sending ~200 events/s over 8 regions; a table (count, late, unique users, top page) prints as each ${AGG_WINDOW_SECONDS}s window closes (Ctrl-C to stop)"
$PY -m aggregator gen --url "http://127.0.0.1:$PORT" --rate 200 --duration 86400 --regions 8 \
  --delayed-fraction 0.01 --bad-fraction 0.002 --window-seconds "$AGG_WINDOW_SECONDS" &
GEN=$!
wait "$GEN"
