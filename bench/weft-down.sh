#!/usr/bin/env bash
# EXTRA_DOWN hook for ../shared/bench/peers.sh: stops the agents weft-up.sh started.
set -u
for p in $(cat "${PIDS_FILE:?}" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
