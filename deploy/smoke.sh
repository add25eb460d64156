#!/usr/bin/env bash
# Deployment smoke test on loopback, the whole pipeline, from the examples in this folder
# (coordinator.yaml / site.yaml with the tiny budgets of smoke.yaml merged over them):
#   CA + server cert (plan-server certs init), 3 sites that make their own keys
#   (plan-client keys init in sites/NAME) and are enrolled (plan-server certs enroll,
#   plan-client keys install), nginx TLS proxy that
#   forwards only /v1/fleet/*, `plan-server coordinate` (pool service with mutual TLS,
#   SuperLink with TLS and SuperNode auth on 127.0.0.1), 3 x `plan-client start` through
#   the proxy; 2 rounds of a tiny GAN, then synthesis (PLAN) + signed export to the pool
#   at each site, pull, phi_down, evaluation at each site, report.
# Checks: the run completes; checkpoints and metrics of both rounds with 3 sites; from a
# hospital's side the control API is refused through the proxy; the coordinator's certs
# folder holds no private key but its own CA and server keys; report.json with
# sites/rounds/pool/utility/privacy/timing; every site synthesised, exported and
# evaluated; the pool store holds images from all 3 sites and `plan-server pool check`
# is clean; the pool service and the SuperLink are gone after `coordinate` exits.
# Everything is torn down on exit (trap); any failure -> non-zero exit.
#
#   deploy/smoke.sh                 the whole pipeline (~3-4 min on 2 cores)
#   deploy/smoke.sh --rounds-only   only the GAN rounds (no pool, no post-training)
#
# Needs: plan-server/plan-client/flwr on PATH (the project's venv), nginx, curl.
# Ports (override by env): SMOKE_SL_PORT (SuperLink), SMOKE_PROXY_PORT, SMOKE_SN_PORT (3 in a row),
# SMOKE_POOL_PORT (pool service). SMOKE_DIR: work folder (default: a new temp dir, removed
# unless SMOKE_KEEP=1). SMOKE_TIMEOUT: seconds for the run (default 420, full 720).
set -euo pipefail

FULL=1
for arg in "$@"; do
  case "$arg" in
    --rounds-only) FULL=0 ;;
    --full) FULL=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --rounds-only or --full)" >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SL_PORT="${SMOKE_SL_PORT:-19093}"
PROXY_PORT="${SMOKE_PROXY_PORT:-19443}"
SN_PORT="${SMOKE_SN_PORT:-19094}"
POOL_PORT="${SMOKE_POOL_PORT:-19444}"
WORK="${SMOKE_DIR:-$(mktemp -d /tmp/plan-smoke.XXXXXX)}"
TIMEOUT="${SMOKE_TIMEOUT:-$(( FULL ? 720 : 420 ))}"
SITES=(hospital-a hospital-b hospital-c)
PIDS=()

log() { echo "[smoke $(date +%H:%M:%S)] $*"; }
fail() { echo "[smoke] FAIL: $*" >&2; exit 1; }

cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null
  done
  if [[ -f "$WORK/nginx/nginx.pid" ]]; then
    nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -s stop 2>/dev/null
  fi
  if [[ $rc -ne 0 ]]; then
    echo "---- smoke failed (rc=$rc); logs in $WORK ----" >&2
    for f in "$WORK"/coordinator.log "$WORK"/state/coordinator/superlink.log "$WORK"/state/coordinator/pool-service.log \
             "$WORK"/state/coordinator/run/error.json "$WORK"/site-*.log "$WORK"/nginx/error.log; do
      [[ -f "$f" ]] && { echo "== $f" >&2; tail -n 25 "$f" >&2; }
    done
  elif [[ -z "${SMOKE_KEEP:-}" && -z "${SMOKE_DIR:-}" ]]; then
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in plan-server plan-client flwr nginx curl python; do
  command -v "$tool" >/dev/null || fail "$tool not found on PATH"
done
mkdir -p "$WORK"
cd "$WORK"
log "work dir $WORK"

# ---- credentials -------------------------------------------------------------
plan-server certs init --dir certs >/dev/null
mkdir -p enrol
for s in "${SITES[@]}"; do
  # at the hospital: keys made in its own folder; only enrolment.json travels to the coordinator
  plan-client keys init --dir "sites/$s" --name "$s" >/dev/null
  cp "sites/$s/enrolment.json" "enrol/$s.enrolment.json"
  # at the coordinator: verify, sign, register the public keys; the response travels back
  plan-server certs enroll "enrol/$s.enrolment.json" --dir certs --name "$s" --out "enrol/$s.response.json" >/dev/null
  plan-client keys install "enrol/$s.response.json" --dir "sites/$s" >/dev/null
done
custody=$(grep -rlE "PRIVATE KEY" certs | sort | tr '\n' ' ')
[[ "$custody" == "certs/ca.key certs/server.key " ]] || fail "private keys in the coordinator's certs folder: $custody"
log "CA, server certificate; ${#SITES[@]} sites made their own keys and were enrolled (certs holds no site key)"

# ---- configs from the examples + tiny data -------------------------------------
python - "$HERE" "$WORK" "$SL_PORT" "$PROXY_PORT" "$SN_PORT" "$POOL_PORT" "$FULL" "${SITES[@]}" <<'PY'
import sys, yaml, numpy as np
from pathlib import Path
here, work, sl, proxy, sn, pool, full, *sites = sys.argv[1:]
here, work = Path(here), Path(work)
c = yaml.safe_load((here / "coordinator.yaml").read_text())
for key, val in yaml.safe_load((here / "smoke.yaml").read_text()).items():
    c[key] = {**c.get(key, {}), **val} if isinstance(val, dict) else val
c["federation"].update(wait_for_nodes_s=240, round_timeout_s=300, post_training=full == "1")
c["coordinator"].update(state_dir=str(work / "state/coordinator"), ca_dir=str(work / "certs"),
                        superlink_port=int(sl),
                        pool_listen=f"127.0.0.1:{pool}")  # loopback here; 0.0.0.0 in coordinator.yaml
(work / "coordinator.yaml").write_text(yaml.safe_dump(c))
rng = np.random.default_rng(0)
size = int(c["data"]["size"])
for i, name in enumerate(sites):
    n = 16 + 8 * i
    arr = {}
    for split, k in (("train", n), ("val", 6), ("test", 6)):
        labels = np.arange(k) % 2
        img = rng.integers(0, 160, (k, size, size))
        img[labels == 1, :, : size // 2] += 90  # a class signal: brighter left half
        arr[f"{split}_images"] = img.clip(0, 255).astype(np.uint8)
        arr[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(work / f"{name}.npz", **arr)
    s = yaml.safe_load((here / "site.yaml").read_text())
    s["site_id"] = name; s["device"] = "cpu"; s["threads"] = 1
    # smoke.yaml's tiny budgets (k 2, 4 planted duplicates) are below the example's minimums:
    # a real site would refuse them, which is what site_minimums is for.
    s.pop("site_minimums", None)
    s["data"].update(source="medmnist", path=str(work / f"{name}.npz"))
    s["site"].update(superlink_address=f"localhost:{proxy}", keys_dir=str(work / "sites" / name),
                     state_dir=str(work / "state" / name), supernode_port=int(sn) + i,
                     pool_address=f"localhost:{pool}")  # pool_keys_dir: default = keys_dir
    (work / f"site-{name}.yaml").write_text(yaml.safe_dump(s))
PY

# ---- nginx proxy from the example server block ----------------------------------
mkdir -p nginx/logs nginx/tmp
sed -e "s|__LISTEN__|127.0.0.1:$PROXY_PORT|" -e "s|__CERTS__|$WORK/certs|g" -e "s|__UPSTREAM__|127.0.0.1:$SL_PORT|" \
  "$HERE/nginx-plan.conf" > nginx/plan.conf
cat > nginx/nginx.conf <<EOF
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 256; }
http {
  access_log $WORK/nginx/access.log;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  include $WORK/nginx/plan.conf;
}
EOF
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -t 2>/dev/null || nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -t
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf"
log "nginx proxy on localhost:$PROXY_PORT -> 127.0.0.1:$SL_PORT (/v1/fleet/* only)"

# ---- coordinator ---------------------------------------------------------------
plan-server coordinate --config coordinator.yaml > coordinator.log 2>&1 &
COORD=$!
PIDS+=("$COORD")
for _ in $(seq 1 120); do
  grep -q "submitted" coordinator.log 2>/dev/null && break
  kill -0 "$COORD" 2>/dev/null || fail "coordinator exited early"
  sleep 1
done
grep -q "submitted" coordinator.log || fail "run not submitted within 120s"
log "coordinator: $(grep submitted coordinator.log | head -1)"

# ---- hospitals -----------------------------------------------------------------
for s in "${SITES[@]}"; do
  plan-client start --config "site-$s.yaml" > "site-$s.log" 2>&1 &
  PIDS+=("$!")
done
log "3 SuperNodes started through the proxy"

# ---- control API through the proxy, from a hospital's side ---------------------
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert sites/hospital-a/ca.crt -X POST \
  -H 'Content-Type: application/protobuf' "https://localhost:$PROXY_PORT/v1/control/list-runs")
[[ "$code" == 403 ]] || fail "control API through the proxy answered HTTP $code (expected 403)"
code=$(curl -s -o /dev/null -w '%{http_code}' --path-as-is --cacert certs/ca.crt -X POST \
  "https://localhost:$PROXY_PORT/v1/fleet/../control/list-runs")
[[ "$code" == 403 || "$code" == 400 || "$code" == 404 ]] || fail "path traversal to the control API answered HTTP $code"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert certs/ca.crt -X POST "https://localhost:$PROXY_PORT/v1/runtime/acquire-task")
[[ "$code" == 403 ]] || fail "runtime API through the proxy answered HTTP $code (expected 403)"
mkdir -p hospital-cli
printf '[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "localhost:%s"\nroot-certificates = "%s"\n' \
  "$PROXY_PORT" "$WORK/sites/hospital-a/ca.crt" > hospital-cli/config.toml
if FLWR_HOME="$WORK/hospital-cli" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
   flwr ls --format json > hospital-cli/ls.json 2>&1 && grep -q '"success": true' hospital-cli/ls.json; then
  fail "flwr ls through the proxy succeeded: the control API is reachable by hospitals"
fi
log "control API refused through the proxy (curl 403, flwr ls fails)"

# ---- wait for the end of the run -------------------------------------------------
t0=$SECONDS
while kill -0 "$COORD" 2>/dev/null; do
  (( SECONDS - t0 < TIMEOUT )) || fail "run not finished after ${TIMEOUT}s"
  sleep 2
done
set +e; wait "$COORD"; rc=$?; set -e
grep -E "^round|completed|ended|error|^pool service|^report|^  " coordinator.log || true
[[ $rc -eq 0 ]] || fail "plan-server coordinate exited $rc"

# ---- checkpoints and metrics -----------------------------------------------------
RUN="$WORK/state/coordinator/run"
for r in 0001 0002; do
  [[ -s "$RUN/checkpoints/round-$r.pt" ]] || fail "checkpoint round-$r.pt missing"
  [[ -s "$RUN/samples/round-$r.png" ]] || fail "sample grid round-$r.png missing"
done
python - "$RUN" <<'PY'
import json, sys, torch
from pathlib import Path
run = Path(sys.argv[1])
meta = json.loads((run / "checkpoints/latest.json").read_text())
assert meta["round"] == 2, meta
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
assert [r["round"] for r in recs] == [1, 2], recs
assert all(r["sites_replied"] == 3 for r in recs), [r["sites_replied"] for r in recs]
assert sorted(s["site"] for s in recs[-1]["sites"]) == ["hospital-a", "hospital-b", "hospital-c"]
ck = torch.load(run / "checkpoints/round-0002.pt", weights_only=False)
assert "generator_ema" in ck and ck["arch"] == {"channels": 1, "size": 16}, ck.get("arch")
print("[smoke] checkpoints: rounds 1-2 with 3/3 sites, latest.json round 2")
PY
if [[ $FULL -eq 0 ]]; then log "OK (rounds only)"; exit 0; fi

# ---- post-training: report, pool, sites ----------------------------------------------
STORE="$WORK/state/coordinator/pool-store"
grep -q "^pool service on 127.0.0.1:$POOL_PORT" coordinator.log || fail "coordinate did not start the pool service"
grep -q "^report: $RUN/report.json" coordinator.log || fail "coordinate did not print the report path"
[[ -f state/coordinator/reader/client.crt ]] || fail "coordinate did not enrol its reader identity"
custody=$(grep -rlE "PRIVATE KEY" certs | sort | tr '\n' ' ')
[[ "$custody" == "certs/ca.key certs/server.key " ]] || fail "private keys in the coordinator's certs folder: $custody"
python - "$POOL_PORT" <<'PY' || fail "the pool service still listens after coordinate exited"
import socket, sys
with socket.socket() as s:
    sys.exit(1 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 0)
PY
for s in "${SITES[@]}"; do
  grep -q "^pool-address = \"localhost:$POOL_PORT\"" "state/$s/node.toml" || fail "$s: node.toml has no pool-address"
  grep -q "^pool-credentials = \"$WORK/sites/$s\"" "state/$s/node.toml" || fail "$s: node.toml has no pool-credentials"
done
plan-server pool check --store "$STORE" --no-progress > pool-check.log 2>&1 || { cat pool-check.log; fail "pool check found problems"; }
python - "$RUN" "$STORE" "${SITES[@]}" <<'PY'
import json, sqlite3, sys
from pathlib import Path
run, store, sites = Path(sys.argv[1]), Path(sys.argv[2]), sorted(sys.argv[3:])
rep = json.loads((run / "report.json").read_text())
for key in ("sites", "rounds", "pool", "utility", "privacy", "timing"):
    assert key in rep, f"report.json lacks {key}"
assert sorted(rep["sites"]) == sites and rep["rounds"] == 2, (rep["sites"], rep["rounds"])
assert sorted(rep["pool"]["per_site"]) == sites and all(v > 0 for v in rep["pool"]["per_site"].values()), rep["pool"]
assert rep["pool"]["n_images"] == sum(rep["pool"]["per_site"].values()) > 0, rep["pool"]
for key in ("accuracy", "balanced_accuracy", "qwk", "real_accuracy"):
    assert key in rep["utility"], f"utility lacks {key}"
for key in ("mia_auc", "mia_tpr_at_1pct_fpr", "dcr_ratio", "too_close_rate"):
    assert key in rep["privacy"], f"privacy lacks {key}"
assert (run / "report.md").is_file()
syn = json.loads((run / "synthesis.json").read_text())["sites"]
ev = json.loads((run / "evaluation.json").read_text())["sites"]
for s in sites:
    assert syn[s]["status"] == "ok" and syn[s]["export-status"] == "stored", (s, syn[s].get("reason"), syn[s].get("export-status"))
    assert ev[s]["status"] == "ok", (s, ev[s].get("reason"))
man = json.loads((run / "pool" / "manifest.json").read_text())
pulled = {e["site_id"] for e in man["images"]}
assert sorted(pulled) == sites, pulled
db = sqlite3.connect(store / "index.sqlite")  # the service has stopped
stored = dict(db.execute("select site_id, sum(n_images) from bundles group by site_id").fetchall())
db.close()
assert sorted(stored) == sites and all(v > 0 for v in stored.values()), stored
print(f"[smoke] post-training: report.json ({rep['pool']['n_images']} pooled images: "
      + ", ".join(f"{k}={v}" for k, v in sorted(rep['pool']['per_site'].items()))
      + f"), 3/3 sites synthesised+exported+evaluated, phi_down accuracy {rep['utility']['accuracy']:.3f}; "
      + f"pool store: {stored}")
PY
log "pool check clean: $(tail -n 1 pool-check.log)"
log "OK"
