#!/usr/bin/env bash
# Runs the MNIST-5k experiments of issue #19 one after another, each resumable: a
# restart skips every finished cell (experiments/results/<name>-mnist5k.cells.json).
# Logs go to benchmarks/_work/logs/. Pin to cores with CPUS (e.g. CPUS=1) so that
# other work on the machine does not share them; the JSON records the usable cores.
#
#   nohup bash experiments/run_mnist5k.sh &            # everything, all cores
#   CPUS=1 nohup bash experiments/run_mnist5k.sh robustness system_profile &
set -u
cd "$(dirname "$0")/.."
mkdir -p benchmarks/_work/logs
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(cache_reuse robustness system_profile correlation_lenet backdoor lds samplers_lissa)
fi
pin=()
if [ -n "${CPUS:-}" ]; then
  pin=(taskset -c "$CPUS")
fi
for name in "${names[@]}"; do
  echo "$(date '+%F %T') start $name"
  if "${pin[@]}" python -u "experiments/$name.py" >> "benchmarks/_work/logs/$name.log" 2>&1; then
    echo "$(date '+%F %T') done $name"
  else
    echo "$(date '+%F %T') FAILED $name (see benchmarks/_work/logs/$name.log)"
  fi
done
