#!/bin/bash
# Interleaved `make run` equivalent (distbn launch -n 2 configs/quickstart.yaml): before (f1a6abd) vs after (HEAD).
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
for i in 1 2 3; do
  for v in before after; do
    if [ $v = before ]; then dir=/tmp/distbn-before; pp=/tmp/distbn-before; else dir=$REPO; pp=$REPO; fi
    cd $dir
    s=$(date +%s.%N)
    PYTHONPATH=$pp "$REPO/.venv/bin/python" -m distbn launch -n 2 configs/quickstart.yaml --run-dir /tmp/qs-$v-$i > /tmp/qs-$v-$i.log 2>&1
    e=$(date +%s.%N)
    echo "$v $i wall $(echo "$e - $s" | bc) $(grep -o 'in [0-9.]* s' /tmp/qs-$v-$i.log | head -1) $(grep 'test  loss' /tmp/qs-$v-$i.log)"
  done
done
