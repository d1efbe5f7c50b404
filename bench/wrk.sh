#!/usr/bin/env bash
# Quick receiver load: wrk posting a signed ~4 KB VEHICLE_STATE body to a running receiver (make up).
# Usage: bench/wrk.sh [connections] [duration]   e.g. bench/wrk.sh 64 20s
set -euo pipefail
cd "$(dirname "$0")/.."
token="${CARHOOK__SMARTCAR__MANAGEMENT_TOKENS:-carhook-dev-token-NOT-FOR-PRODUCTION}"; token="${token%%,*}"
body=$(mktemp)
python3 - "$body" <<'PY'
import json, sys, uuid
signals = [{"code": f"group{i}-signal{i}", "name": f"Signal{i}", "group": f"Group{i}",
            "body": {"unit": "percent", "value": i * 1.5}, "status": {"value": "SUCCESS"},
            "meta": {"oemUpdatedAt": 1731940328000 + i, "retrievedAt": 1731940330000}} for i in range(20)]
ev = {"eventId": str(uuid.uuid4()), "eventType": "VEHICLE_STATE", "vehicleId": "bench-car",
      "data": {"user": {"id": "u"}, "vehicle": {"id": "bench-car", "make": "TESLA", "model": "3", "year": 2020},
               "signals": signals}, "meta": {"version": "4.0", "deliveryId": "d", "deliveredAt": 1731940330000, "mode": "TEST"}}
open(sys.argv[1], "w").write(json.dumps(ev, separators=(",", ":")))
PY
sig=$(openssl dgst -sha256 -hmac "$token" -hex <"$body" | awk '{print $NF}')
echo "body: $(wc -c <"$body") bytes"
CARHOOK_BODY="$body" CARHOOK_SIG="$sig" wrk -t2 -c"${1:-64}" -d"${2:-20s}" --latency -s bench/signed_post.lua \
  "http://${CARHOOK__RECEIVER__LISTEN:-127.0.0.1:8080}/webhooks/smartcar"
rm -f "$body"
