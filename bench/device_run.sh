#!/usr/bin/env bash
# One prepared run on a lent GPU, 8 minutes at most: every step has its own timeout (cut to what is left
# of the budget), a failed or timed-out step does not stop the later ones, and every bench appends each
# table to its results file the moment it is done, so a cut step still returns what it finished.
#   1. throughput_bench on a large corpus (1,024 utterances): the forwards (by hand, per-utterance,
#      batched, gemm front ends) and collect with all statistics, all tokens and phone-mid, the loader
#      alone with the default workers (per worker), the host's waits for the device: the number that
#      matters, so it runs first (its collect names the label_stats design the engine chose at its start);
#   2. the kernel tests on the GPU in parallel (pytest-xdist, in the card's image): bf16, both label_stats
#      designs (the one-read runs carried across tiles and programs, with real atomics and concurrency),
#      the fold_sums tests and the engine on the GPU (tests/test_gpu.py);
#   3. kernel_bench: first the label_stats designs, split and one-read, each swept and against one read of
#      the rows (target <= 2x), on the fp32 rows too, with the design the engine's own timing picks (both
#      token shares, printed before anything else); then the GEMMs, the fused kernel, the fp32 route and its
#      bound, the precision study, and engine runs (fp32 vs model precision, side stream vs in line, split
#      vs one-read);
#   4. in what is left of the budget (each skipped without failing when nothing is): collect_bench (plain
#      forward vs collect vs the paper's per-token loop, a small corpus), then throughput_bench --family
#      whisper (a random Whisper-base encoder, its own 32-utterance corpus: the forward by hand vs the
#      engine's, whose log-mel stays on the GPU, and collect / its forward), then prepare_bench on the
#      machine's CPU cores (16 on the lent machines; a development machine has 2, where one process's Praat
#      threads already fill both): `prepare -j 1`, the default workers, and torchrun 2 processes x -j 1
#      against one process, the folders compared byte for byte.
# Results come back as at most 8 files in $OUT: steps.txt (each step's exit status, its wall time and
# the seconds since the start), one .md per bench, and logs.tar.gz with every step's full output.
# Wheels of packages the card's image lacks may wait in .whl/ (installed into /tmp/site with the
# package); without them the source checkout is imported as it is (neurostat.kernels resolves there too).
set -uo pipefail
OUT=${OUT:-bench/out}
BUDGET=${BUDGET:-480}  # seconds for the whole script
mkdir -p "$OUT" /tmp/neurostat-logs
root=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site .
    export PYTHONPATH=/tmp/site
else
    export PYTHONPATH=$root
fi
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
corpora=/tmp/neurostat-corpora  # a corpus synthesised by one step is reused by the next ones
failed=0
echo "setup: ${SECONDS} s since start" | tee -a "$OUT/steps.txt"
optional=" collect_bench whisper prepare "  # steps that only use what the others left: a skip is no failure
step() {  # step NAME SECONDS COMMAND...: at most SECONDS (less if the budget is nearly spent)
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS - 10))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "$name: skipped, ${SECONDS} s since start leave no time" | tee -a "$OUT/steps.txt"
        case "$optional" in *" $name "*) ;; *) failed=1 ;; esac
        return
    fi
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "/tmp/neurostat-logs/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || failed=1
    echo "$name: rc $rc$([ $rc -eq 124 ] && echo ' (timed out)'), $((SECONDS - start)) s of $limit, ${SECONDS} s since start" \
        | tee -a "$OUT/steps.txt"
    tail -3 "/tmp/neurostat-logs/$name.log"
}
step throughput 200 python3 bench/throughput_bench.py --device cuda --dtype bfloat16 --speakers 32 --utterances 32 \
    --tokens all --also-tokens phone-mid --repeat 1 --no-paper --corpus-dir "$corpora" --results "$OUT/throughput.md"
parallel=$(python3 -c "import xdist" 2> /dev/null && echo "-n 8")  # compiles the kernels' variants side by side
step kernel_tests 60 bash -c "cd /tmp && python3 -m pytest -q -p no:cacheprovider $parallel --rootdir '$root' \
    '$root/tests/kernels' '$root/tests/test_gpu.py' -k 'bfloat16 or one_read or fold_sums or gpu'"
step kernel_bench 190 python3 bench/kernel_bench.py --repeat 3 --results "$OUT/kernel.md"
step collect_bench 40 python3 bench/collect_bench.py --device cuda --dtype bfloat16 --backend triton --speakers 8 \
    --utterances 8 --corpus-dir "$corpora" --results "$OUT/collect.md"
step whisper 60 python3 bench/throughput_bench.py --family whisper --device cuda --dtype bfloat16 --speakers 4 \
    --utterances 8 --tokens all --also-tokens phone-mid --repeat 1 --no-paper --corpus-dir "$corpora" \
    --results "$OUT/whisper.md"
step prepare 70 python3 bench/prepare_bench.py --speakers 16 --utterances 32 --repeat 1 --results "$OUT/prepare.md" \
    --machine "the device machine's CPU, $(nproc) cores"
tar -czf "$OUT/logs.tar.gz" -C /tmp neurostat-logs
echo "done: ${SECONDS} s since start" | tee -a "$OUT/steps.txt"
exit $failed
