#!/usr/bin/env bash
# The test command: what the README's "Run the tests" says and what CI (.ci/run) runs.
# Extra arguments go to both nextest runs (e.g. --no-fail-fast, --profile ci).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --bins
cargo nextest run --workspace "$@"

# The controller's end-to-end tests a second time with every test controller keeping
# its state in an etcd of its own instead of SQLite (tests/src/fleet.rs, TestStore).
# Left out: fleet_hosts (its controller is in another network namespace, so it stays on
# SQLite) and etcd_store (on etcd already, in the run above).
controller_tests='binary_id(/^fleet-tests::(controller_.*|dashboard.*|guard_rails|impostor|in_flight|node_page|rollout_progress|conn_limits)$/)'
# controller_ha runs its group on a shared etcd cluster in the first run already.
# --workspace, not -p fleet-tests: cargo unifies features per selection, and with -p the
# build dependencies resolve differently, so everything from prost-build up would be
# built a second time (CI once ran out of disk doing so); the filter picks the tests.
FLEET_TEST_STORE=etcd cargo nextest run --workspace -E "$controller_tests - binary_id(fleet-tests::controller_ha)" "$@"
