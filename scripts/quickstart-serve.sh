#!/usr/bin/env bash
# The last part of `make quickstart`: serve the base model and the example adapters, wait until
# the server answers, print a curl example for each task, open the Gradio page on it, print both
# URLs, then keep serving (Ctrl-C stops both).
# LORASTACK_QUICKSTART_NO_WAIT=1 stops once both answer instead (used to check the quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${LORASTACK_PORT:-8000}
URL="http://127.0.0.1:$PORT"
PAGE_PORT=${LORASTACK_DEMO_PORT:-7860}
PAGE="http://127.0.0.1:$PAGE_PORT"
BIN=.venv/bin

if curl -sf "$URL/health" >/dev/null 2>&1; then
  echo "quickstart: something already answers on $URL; stop it or set LORASTACK_PORT" >&2
  exit 1
fi
"$BIN/lorastack" serve --port "$PORT" --log-level warning &
SERVER=$!
PAGE_PID=""
trap 'kill $SERVER $PAGE_PID 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM

echo "quickstart: starting the server on $URL (vLLM takes about 30 s on a 2-core CPU) ..."
for _ in $(seq 1 600); do
  if curl -sf "$URL/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "quickstart: the server exited" >&2; exit 1; fi
  sleep 1
done
curl -sf "$URL/health" >/dev/null || { echo "quickstart: the server did not become healthy" >&2; exit 1; }

CLASSIFY='{"model": "reviews-classify", "input": "This medicine gave me my life back, no side effects at all."}'
CHAT='{"model": "reviews-condition", "temperature": 0, "max_tokens": 12, "messages": [
  {"role": "system", "content": "You read patient reviews of medicines and name the condition being treated."},
  {"role": "user", "content": "Drug: Sertraline\nReview: I feel less hopeless and sleep better since I started it.\n\nWhich condition is this medicine treating? Answer with the condition name only."}]}'
echo
echo "The server is up at $URL. Try it:"
echo
echo "curl -s $URL/v1/models"
curl -s "$URL/v1/models" | python3 -c 'import json,sys; [print("  ", m["id"]) for m in json.load(sys.stdin)["data"]]'
echo
echo "curl -s $URL/v1/classify -H 'Content-Type: application/json' -d '$CLASSIFY'"
curl -s "$URL/v1/classify" -H 'Content-Type: application/json' -d "$CLASSIFY"
echo; echo
echo "curl -s $URL/v1/chat/completions -H 'Content-Type: application/json' -d '$CHAT'"
curl -s "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d "$CHAT"
echo; echo

"$BIN/lorastack" demo --server "$URL" --port "$PAGE_PORT" > "${TMPDIR:-/tmp}/lorastack-demo.log" 2>&1 &
PAGE_PID=$!
for _ in $(seq 1 120); do
  if curl -sf "$PAGE" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$PAGE_PID" 2>/dev/null; then
    echo "quickstart: the page exited; its log:" >&2; cat "${TMPDIR:-/tmp}/lorastack-demo.log" >&2; exit 1
  fi
  sleep 1
done
curl -sf "$PAGE" >/dev/null || { echo "quickstart: the page did not start" >&2; exit 1; }

echo "quickstart: the server is at $URL (OpenAI API, /v1/classify, /metrics)"
echo "quickstart: the page is at  $PAGE"
if [ "${LORASTACK_QUICKSTART_NO_WAIT:-0}" = 1 ]; then
  echo "quickstart: done (LORASTACK_QUICKSTART_NO_WAIT=1: stopping the server and the page)"
  exit 0
fi
echo "quickstart: Ctrl-C stops both."
wait "$SERVER"
