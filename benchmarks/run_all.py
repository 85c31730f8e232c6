"""`make bench`: every benchmark, one after the other, each printing its own table."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
status = 0
# the training-throughput table (today's path vs the fast one) also goes into benchmarks/README.md
SCRIPTS = (("bench_train_speed.py", "--write-readme", "--parallel"), ("bench_core.py",), ("bench_train_process.py",),
           ("bench_mmm.py",), ("bench_pretrained.py",), ("bench_head_dtype.py",))
for script, *arguments in SCRIPTS:
    print(f"\n=== {script} ===", flush=True)
    status |= subprocess.call([sys.executable, str(HERE / script), *arguments])
sys.exit(status)
