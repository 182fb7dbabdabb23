#!/usr/bin/env bash
# Checks a pegaflow binary's hardening from its ELF headers: position-
# independent (type DYN), full RELRO (a GNU_RELRO segment and BIND_NOW),
# and with --stripped no symbol table. Exit 1 naming what is missing.
set -euo pipefail
stripped=0
if [ "${1:-}" = "--stripped" ]; then stripped=1; shift; fi
bin=${1:?usage: check-binary.sh [--stripped] BINARY}
command -v readelf >/dev/null || { echo "check-binary: readelf (binutils) is required" >&2; exit 1; }
fail=()
readelf -h "$bin" | grep -Eq 'Type:[[:space:]]+DYN' || fail+=("not position-independent (ELF type is not DYN)")
readelf -lW "$bin" | grep -q 'GNU_RELRO' || fail+=("no RELRO segment")
readelf -dW "$bin" | grep -Eq 'BIND_NOW|FLAGS.*NOW' || fail+=("partial RELRO only (no BIND_NOW)")
if [ "$stripped" = 1 ] && readelf -SW "$bin" | grep -q '\.symtab'; then fail+=("not stripped (.symtab present)"); fi
# It must also start: with BIND_NOW the loader fails on any symbol nothing
# defines (go-nvml's NVML calls, were engine/topology/nvmlshim to lack one:
# make nvml-shim).
"$bin" version >/dev/null 2>&1 || fail+=("does not start ($bin version: $("$bin" version 2>&1 | head -c 300))")
if [ ${#fail[@]} -gt 0 ]; then
  (IFS=';'; echo "check-binary: $bin: ${fail[*]}") >&2
  exit 1
fi
echo "check-binary: $bin: PIE, full RELRO (GNU_RELRO + BIND_NOW)$([ "$stripped" = 1 ] && echo ', stripped'), starts"
