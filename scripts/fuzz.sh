#!/usr/bin/env bash
# Runs agentd's cargo-fuzz targets (fuzz/, issue 13 item 5), one after the other, each for SECONDS.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      default: 600 s each, every target
#
# The test command runs `scripts/fuzz.sh 5` (a smoke run: builds every target, replays the committed corpus,
# fuzzes a few seconds). fuzz/RUNS.md records the 10-minute runs.
#
# Environment:
#   FUZZ_SANITIZER   address | none. Default: address for runs of 60 s or more, none for shorter (smoke) runs,
#                    whose cold build it keeps shorter (see fuzz/RUNS.md).
#   FUZZ_TARGET_DIR  where the fuzz build goes (default fuzz/target). Its own directory: the instrumented
#                    build never mixes with the workspace's.
#   FUZZ_RSS_MB      libFuzzer's -rss_limit_mb (default 2048): a target using more fails the run.
#   FUZZ_GROW=1      add new inputs to the committed corpus fuzz/corpus/TARGET (then minimise it with
#                    `cargo fuzz cmin`); by default they go to a scratch directory and the corpus is only read.
#   FUZZ_LOG_DIR     where each target's libFuzzer output goes (default FUZZ_TARGET_DIR/logs).
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=address); RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them, so no nightly toolchain is needed. The last line is "fuzz: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

secs=${1:-600}
shift || true
all=(native_frame agentkit_frame navi_frame config openai_sse sqlite_tail upload_name)
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    targets=("${all[@]}")
fi
if ! [[ $secs =~ ^[0-9]+$ ]] || [[ $secs -lt 1 ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (targets: ${all[*]})" >&2
    exit 2
fi
for t in "${targets[@]}"; do
    if [[ ! " ${all[*]} " == *" $t "* ]]; then
        echo "unknown fuzz target '$t' (targets: ${all[*]})" >&2
        exit 2
    fi
done

# The largest input per target: frames and config files of a few pages, upstream bodies and tail files of
# several records, file names of a path's length.
max_len() {
    case $1 in
        native_frame | agentkit_frame | navi_frame | config) echo 16384 ;;
        openai_sse | sqlite_tail) echo 65536 ;;
        upload_name) echo 4096 ;;
    esac
}

# Runs of a minute or more go through cargo-fuzz (installed when missing). Smoke runs (under 60 s, the test
# command's) build the targets with cargo directly, with the flags `cargo fuzz build --dev --sanitizer none`
# gives (libFuzzer's coverage instrumentation, `--cfg fuzzing`, debug assertions), and run the binaries as
# cargo-fuzz would: on a cold machine that spares the install of cargo-fuzz, about a minute of compiling.
direct=0
if [[ $secs -lt 60 && -z ${FUZZ_SANITIZER:-} ]]; then
    direct=1
elif ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    # A debug build: cargo-fuzz only drives cargo and libFuzzer, and this halves its cold install.
    cargo install cargo-fuzz --locked --debug
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$root/fuzz/target}"
if [[ -n ${FUZZ_SANITIZER:-} ]]; then
    sanitizer=$FUZZ_SANITIZER
elif [[ $secs -ge 60 ]]; then
    sanitizer=address
else
    sanitizer=none
fi
rss_mb=${FUZZ_RSS_MB:-2048}
log_dir=${FUZZ_LOG_DIR:-$CARGO_TARGET_DIR/logs}
mkdir -p "$log_dir"
# -a: debug assertions and overflow checks, so an arithmetic overflow is a crash, not a silent wrap. Smoke runs
# (under 60 s) build unoptimised (--dev, which has those checks too): on a cold machine the build is most of
# their cost, and a few seconds of fuzzing gain nothing from speed.
if [[ $secs -ge 60 ]]; then
    build_flags=(--fuzz-dir "$root/fuzz" -O -a --sanitizer "$sanitizer")
else
    build_flags=(--fuzz-dir "$root/fuzz" --dev --sanitizer "$sanitizer")
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
echo "== building the fuzz targets (sanitizer: $sanitizer$( ((direct)) && echo ', cargo directly'))"
start=$(date +%s)
if ((direct)); then
    RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Clink-dead-code -Cdebug-assertions \
-Cllvm-args=-sanitizer-coverage-stack-depth" \
        cargo build --manifest-path "$root/fuzz/Cargo.toml" --target "$triple" --bins --quiet
else
    cargo fuzz build "${build_flags[@]}"
fi
echo "   built in $(($(date +%s) - start)) s"

passed=0
failed=0
for t in "${targets[@]}"; do
    corpus=$root/fuzz/corpus/$t
    mkdir -p "$corpus" "$root/fuzz/artifacts/$t"
    if [[ ${FUZZ_GROW:-0} == 1 ]]; then
        dirs=("$corpus")
    else
        # libFuzzer writes new inputs to the first directory: a scratch one, so the committed corpus stays put.
        scratch=$CARGO_TARGET_DIR/corpus-scratch/$t
        rm -rf "$scratch"
        mkdir -p "$scratch"
        dirs=("$scratch" "$corpus")
    fi
    log=$log_dir/$t.log
    echo "== $t: ${secs} s"
    status=0
    fuzz_args=(-max_total_time="$secs" -max_len="$(max_len "$t")" -rss_limit_mb="$rss_mb" -timeout=10
        -print_final_stats=1)
    if ((direct)); then
        "$CARGO_TARGET_DIR/$triple/debug/$t" -artifact_prefix="$root/fuzz/artifacts/$t/" "${fuzz_args[@]}" \
            "${dirs[@]}" >"$log" 2>&1 || status=$?
    else
        cargo fuzz run "${build_flags[@]}" "$t" "${dirs[@]}" -- "${fuzz_args[@]}" >"$log" 2>&1 || status=$?
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n1)
    cov=$(grep -E '^#[0-9]+' "$log" | tail -n1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[^ ]+' || true)
    if [[ $status -eq 0 ]]; then
        passed=$((passed + 1))
        echo "   ok: ${execs:-?} execs, ${cov:-?}, peak RSS ${rss:-?} MB (log: $log)"
    else
        failed=$((failed + 1))
        echo "   FAILED (exit $status): last lines of $log:"
        tail -n 40 "$log" | sed 's/^/   | /'
    fi
done
echo "fuzz: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
