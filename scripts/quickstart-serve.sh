#!/usr/bin/env bash
# The last part of `make quickstart`: serve the base model and the example adapters, wait until
# the server answers, print a curl example for each task, then keep serving (Ctrl-C stops).
# LORASTACK_QUICKSTART_NO_WAIT=1 stops after the examples instead (used to check the quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${LORASTACK_PORT:-8000}
URL="http://127.0.0.1:$PORT"
BIN=.venv/bin

if curl -sf "$URL/health" >/dev/null 2>&1; then
  echo "quickstart: something already answers on $URL; stop it or set LORASTACK_PORT" >&2
  exit 1
fi
"$BIN/lorastack" serve --port "$PORT" --log-level warning &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT INT TERM

echo "quickstart: starting the server on $URL (vLLM takes about a minute on a 2-core CPU) ..."
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

if [ "${LORASTACK_QUICKSTART_NO_WAIT:-0}" = 1 ]; then
  echo "quickstart: done (LORASTACK_QUICKSTART_NO_WAIT=1: stopping the server)"
  exit 0
fi
echo "quickstart: serving on $URL; Ctrl-C stops."
wait "$SERVER"
