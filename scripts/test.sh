#!/usr/bin/env bash
# `make test`: every test, in the release profile that `make build` already compiled (one build
# serves both; see README "Costs of the first run").
#
# A test that needs something outside the crate is `#[ignore = "needs NEED[, NEED...]"]` and calls
# `require` (tests/common/mod.rs), so plain `cargo test` reports it ignored, never passed. Here,
# pass 1 runs everything else and collects those reasons; pass 2 runs, with `--ignored`, each such
# test whose needs this machine meets; the last line names every test that did not run and what
# it needed. The forms of NEED (the same as `need_met` in tests/common/mod.rs):
#   pip:MODULE       a module `python3` (first on PATH) imports     pip:gguf
#   python3-MODULE   a Debian package `/usr/bin/python3` imports    python3-libtorrent
#   a/path           a file under the repository root               models_cache/SmolLM2-...gguf
#   cpu:FEATURE      decided by build.rs for the CPU it built for   cpu:ggml-repack-q4_0
#   anything else    a program on PATH                              aria2c
# SHARDNET_REQUIRE_TOOLS=1 makes programs and Python modules mandatory, SHARDNET_REQUIRE_MODELS=1
# files (`.ci/run` sets both): a test whose need is missing then runs and fails in `require`.
# Arguments go to both `cargo test` runs before `--` (e.g. `--test torrent`).
set -uo pipefail
cd "$(dirname "$0")/.."

met() {
    case "$1" in
        pip:*) python3 -c "import ${1#pip:}" >/dev/null 2>&1 ;;
        python3-*) /usr/bin/python3 -c "import ${1#python3-}" >/dev/null 2>&1 ;;
        cpu:*) false ;;
        */*) [ -f "$1" ] ;;
        *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

mandatory() {
    case "$1" in
        cpu:*) false ;;
        */*) [ -n "${SHARDNET_REQUIRE_MODELS:-}" ] ;;
        *) [ -n "${SHARDNET_REQUIRE_TOOLS:-}" ] ;;
    esac
}

mkdir -p target
log=target/test-pass1.log
# --no-fail-fast: a failing test binary must not stop the others (whose ignored tests would then
# go unlisted).
cargo test --release --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# "Running tests/torrent.rs (...)" names the binary of the "test NAME ... ignored, needs X" lines after it.
run=()
skipped=()
while IFS=$'\t' read -r binary name needs; do
    ok=1
    missing=()
    IFS=',' read -ra list <<<"$needs"
    for need in "${list[@]}"; do
        need=$(echo "$need" | xargs)
        if ! met "$need" && ! mandatory "$need"; then
            ok=0
            missing+=("$need")
        fi
    done
    if [ "$ok" = 1 ]; then
        run+=("$name")
    else
        skipped+=("$binary::$name (needs $(
            IFS=,
            echo "${missing[*]}" | sed 's/,/, /g'
        ))")
    fi
done < <(awk '
    /^ *Running / { b = $2; sub(/^tests\//, "", b); sub(/\.rs$/, "", b); if ($2 == "unittests") { b = $3; sub(/\.rs$/, "", b); gsub(/\//, "::", b) } }
    /^test .* \.\.\. ignored, needs / { n = $2; r = $0; sub(/.*\.\.\. ignored, needs /, "", r); printf "%s\t%s\t%s\n", b, n, r }
' "$log")

if [ "${#run[@]}" -gt 0 ]; then
    echo "make test: running ${#run[@]} test(s) whose outside needs are met: ${run[*]}"
    cargo test --release --no-fail-fast "$@" -- --ignored --exact "${run[@]}" || status=1
fi

if [ "$status" != 0 ]; then
    echo "make test: FAILED (see the failures above)"
fi
if [ "${#skipped[@]}" -eq 0 ]; then
    echo "make test: every test ran"
else
    list=$(printf '%s; ' "${skipped[@]}")
    echo "make test: ${#skipped[@]} test(s) did not run: ${list%; }"
fi
exit "$status"
