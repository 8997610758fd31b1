#!/usr/bin/env bash
# One prepared run on a lent GPU: the bf16 kernel tests and the fold_sums tests, throughput_bench,
# kernel_bench (kernel tables, the label_stats split design against one read of the rows, the bf16/fp32
# precision study, engine runs), collect_bench and scale_bench (the per-GPU rate and the loader for the
# 960 h projection; a multi-process NCCL run where the machine has several GPUs), results in $OUT
# (with each step's exit status and wall time in $OUT/steps.txt, to size the next timeout, and its
# output in $OUT/<step>.log). A failed step does not stop the later ones: the card's time is scarce.
# Wheels of packages the card's image lacks may wait in .whl/ (installed into /tmp/site with the
# package); without them the source checkout is imported as it is (neurostat.kernels resolves there too).
set -euo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
root=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site .
    export PYTHONPATH=/tmp/site
else
    export PYTHONPATH=$root
fi
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
failed=0
run() {  # run NAME COMMAND...: its output in $OUT/NAME.log; a failure is recorded and the next step still runs
    local name=$1; shift
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || failed=1
    echo "$name: rc $rc, ${SECONDS} s since start" | tee -a "$OUT/steps.txt"
    tail -3 "$OUT/$name.log"
}
set +e
echo "setup: ${SECONDS} s since start" | tee -a "$OUT/steps.txt"
run kernel_tests bash -c "cd /tmp && python3 -m pytest -q -p no:cacheprovider --rootdir '$root' '$root/tests/kernels' -k 'bfloat16 or fold_sums'"
run kernel_bench timeout 300 python3 bench/kernel_bench.py --repeat 3 --results "$OUT/kernel.md"
run throughput_bench python3 bench/throughput_bench.py --device cuda --dtype bfloat16 --speakers 16 --utterances 8 -j 8 \
    --results "$OUT/throughput.md"
run collect_bench python3 bench/collect_bench.py --device cuda --dtype bfloat16 --backend triton --speakers 8 \
    --utterances 8 -j 4 --results "$OUT/collect.md"
run scale_bench python3 bench/scale_bench.py --device cuda --dtype bfloat16 --backend triton --speakers 8 \
    --utterances 4 -j 4 --results "$OUT/scale.md"
exit $failed
