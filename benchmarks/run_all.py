"""`make bench`: every benchmark, one after the other, each printing its own table."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
status = 0
for script in ("bench_core.py", "bench_train_process.py", "bench_mmm.py", "bench_pretrained.py"):
    print(f"\n=== {script} ===", flush=True)
    status |= subprocess.call([sys.executable, str(HERE / script)])
sys.exit(status)
