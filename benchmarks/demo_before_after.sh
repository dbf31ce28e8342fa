#!/bin/bash
# make demo's command, timed: an earlier checkout (BEFORE: a folder holding a "melfusion" link to its src/,
# e.g. `git worktree add /tmp/base 1054f13 && mkdir /tmp/basepath && ln -s /tmp/base/src /tmp/basepath/melfusion`)
# and the working tree (after), alternating, 4 runs each
cd /work/main
export HF_HUB_OFFLINE=1
for i in 1 2 3 4; do
  s=$(date +%s.%N); PYTHONPATH=${BEFORE:-/tmp/basepath} .venv/bin/python -c "from melfusion.cli import main; main(['generate','--image','examples/images/blue-bright.png','--text','a calm flute melody','--out','/tmp/d_before.wav','--spectrogram','/tmp/d_before.png','--overwrite'])" >/dev/null 2>&1; e=$(date +%s.%N); echo "before $(echo "$e - $s" | bc)"
  s=$(date +%s.%N); .venv/bin/python -c "from melfusion.cli import main; main(['generate','--image','examples/images/blue-bright.png','--text','a calm flute melody','--out','/tmp/d_after.wav','--spectrogram','/tmp/d_after.png','--overwrite'])" >/dev/null 2>&1; e=$(date +%s.%N); echo "after $(echo "$e - $s" | bc)"
done
