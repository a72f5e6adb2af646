#!/usr/bin/env bash
# The demo: installs what is missing, builds the agent and a tiny guest, starts `plasmavmc agent`
# on examples/demo.json, waits for the guest to boot, and shows status and console.
# Leaves the agent and the VM running; prints how to stop them.
set -euo pipefail
cd "$(dirname "$0")/.."

demo=/var/lib/plasmavmc-demo      # the paths examples/demo.json names
run_dir=/run/plasmavmc-demo
state_dir=$demo/state

./scripts/install-deps.sh
cargo build --release --locked
plasmavmc=$PWD/target/release/plasmavmc

mkdir -p "$demo" "$state_dir" "$run_dir"
./tests/guest/build.sh "$demo/guest"
[ -e "$demo/data.qcow2" ] || qemu-img create -q -f qcow2 "$demo/data.qcow2" 64M
"$plasmavmc" validate examples/demo.json

if "$plasmavmc" status --run-dir "$run_dir" >/dev/null 2>&1; then
  echo "quickstart: an agent already runs on $run_dir; reloading it"
  "$plasmavmc" reload --wait --run-dir "$run_dir"
else
  nohup setsid "$plasmavmc" agent --config "$PWD/examples/demo.json" \
    --state-dir "$state_dir" --run-dir "$run_dir" >"$demo/agent.log" 2>&1 &
  echo "quickstart: agent started (pid $!), log in $demo/agent.log"
fi

for _ in $(seq 100); do
  "$plasmavmc" status --run-dir "$run_dir" >/dev/null 2>&1 && break
  sleep 0.1
done
# An earlier `plasmavmc stop demo` holds across agent restarts; the demo wants it running.
"$plasmavmc" start demo --run-dir "$run_dir" >/dev/null

console=$run_dir/vms/demo/console.log
echo "quickstart: waiting for the guest to boot (software emulation: ~10 s)"
for _ in $(seq 120); do
  grep -q PLASMAVMC-GUEST-READY "$console" 2>/dev/null && break
  sleep 0.5
done
"$plasmavmc" status --run-dir "$run_dir"
echo "--- last lines of $console"
tail -n 5 "$console" || true
cat <<EOM

Get into the guest (a root shell; Ctrl-] detaches):
  $plasmavmc console demo --run-dir $run_dir
Try a live change: edit examples/demo.json (raise "vcpus" to 2, add a disk), then
  $plasmavmc plan --config examples/demo.json --run-dir $run_dir
  $plasmavmc reload --wait --run-dir $run_dir
Stop everything:
  $plasmavmc stop demo --run-dir $run_dir && pkill -f 'plasmavmc agent --config $PWD/examples/demo.json'
EOM
