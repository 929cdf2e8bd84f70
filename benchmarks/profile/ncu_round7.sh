#!/bin/bash
# Round 7 profile (docs/kernels.md): every case of round7_cases.json profiled once by Nsight Compute in one process
# (each case's third launch, inside cudaProfilerStart/Stop), then the same cases timed and checked without ncu.
# Usage (device, repo root, PYTHONPATH set): bash benchmarks/profile/ncu_round7.sh OUTDIR
set -u
OUT=${1:?outdir}
CASES=benchmarks/profile/round7_cases.json
LOG=$OUT/log.txt
{ ncu --version; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv; } >>"$LOG" 2>&1
ncu --query-metrics --chip gh100 >"$OUT/m.txt" 2>&1 || true
EXTRA=""
for m in dram__bytes_read.sum dram__bytes_read.sum.per_second sm__throughput.avg.pct_of_peak_sustained_elapsed \
  smsp__issue_active.avg.pct_of_peak_sustained_active sm__warps_active.avg.pct_of_peak_sustained_active \
  smsp__inst_executed.sum l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum \
  lts__t_sectors_srcunit_tex_op_read.sum l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum \
  l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum smsp__thread_inst_executed_per_inst_executed.ratio; do
  base=${m%%.*}
  if grep -q "^$base\b\|^ *$base " "$OUT/m.txt"; then EXTRA="$EXTRA,$m"; else echo "metric not listed: $m" >>"$LOG"; fi
done
EXTRA=${EXTRA#,}
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters --section ComputeWorkloadAnalysis --section InstructionStats"
PROF="ncu --clock-control none --target-processes all -k regex:sgemv --profile-from-start off --import-source no"
T0=$(date +%s)
$PROF $SECTIONS ${EXTRA:+--metrics $EXTRA} -o "$OUT/prof" -f \
  python3 benchmarks/gemv_profile.py --cases $CASES --launches 3 --profile-range >>"$LOG" 2>&1
rc=$?
if [ $rc -ne 0 ] || [ ! -f "$OUT/prof.ncu-rep" ]; then
  echo "first ncu run rc=$rc: retry with --set full and no extra metrics" >>"$LOG"
  $PROF --set full -o "$OUT/prof" -f python3 benchmarks/gemv_profile.py --cases $CASES --launches 3 --profile-range >>"$LOG" 2>&1
fi
echo "ncu took $(( $(date +%s) - T0 )) s" >>"$LOG"
ncu -i "$OUT/prof.ncu-rep" --page details --csv >"$OUT/details.csv" 2>>"$LOG"
ncu -i "$OUT/prof.ncu-rep" --page raw --csv >"$OUT/raw.csv" 2>>"$LOG"
ncu -i "$OUT/prof.ncu-rep" --page source --csv --print-source sass >"$OUT/source.csv" 2>>"$LOG" || echo "source page failed" >>"$LOG"
gzip -f "$OUT/details.csv" "$OUT/raw.csv" "$OUT/source.csv"
rm -f "$OUT/m.txt"
T0=$(date +%s)
python3 benchmarks/gemv_profile.py --cases $CASES --launches 1 --check --time --out "$OUT/timing.jsonl" >>"$LOG" 2>&1
echo "timing took $(( $(date +%s) - T0 )) s" >>"$LOG"
ls -la "$OUT" >>"$LOG"
