#!/usr/bin/env bash
# Run every fuzz harness for FUZZ_SECONDS each, one after the other, on its seed corpus (fuzz/corpus/<t>);
# new corpus entries go to fuzz/.work/corpus/<t>, crashing inputs to fuzz/.work/crashes/<t>-*, logs to
# fuzz/.work/<t>.log. Exits 1 when any harness crashed (or timed out / ran out of memory).
# FUZZ_KEEP_GOING=1: after a crash, start the harness again for the time left, so one finding does not
# end the run. `make fuzz` calls this; PYTHON, FUZZ_SECONDS and FUZZ_TARGETS may be set.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SECONDS_EACH=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-image tar caption input}
KEEP_GOING=${FUZZ_KEEP_GOING:-0}
WORK=fuzz/.work
mkdir -p "$WORK/crashes"
status=0
for t in $TARGETS; do
    case $t in
        caption) max_len=4096 ;;
        input) max_len=16384 ;;
        *) max_len=65536 ;;
    esac
    mkdir -p "$WORK/corpus/$t"
    log="$WORK/$t.log"
    : >"$log"
    end=$(($(date +%s) + SECONDS_EACH))
    while :; do
        left=$((end - $(date +%s)))
        [ "$left" -gt 0 ] || break
        echo "== fuzz_$t: ${left}s (log: $log)"
        "$PYTHON" "fuzz/fuzz_$t.py" "$WORK/corpus/$t" "fuzz/corpus/$t" \
            -max_total_time="$left" -rss_limit_mb=2048 -timeout=10 -max_len="$max_len" \
            -artifact_prefix="$WORK/crashes/$t-" -print_final_stats=1 >>"$log" 2>&1
        rc=$?
        if [ "$rc" -ne 0 ]; then
            status=1
            echo "!! fuzz_$t exited $rc: see $log and $WORK/crashes/$t-*"
            [ "$KEEP_GOING" = 1 ] || break
        else
            break
        fi
    done
    grep -E "^#[0-9]+" "$log" | tail -n 1
    grep -E "stat::number_of_executed_units|stat::average_exec_per_sec" "$log" | tail -n 2
done
exit $status
