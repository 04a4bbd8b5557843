"""Print the learning rate (`lr`) or the run directory (`run`) of the sweep's run with the best validation accuracy.

Usage: python best.py lr|run SWEEP_DIR. Used by run.sh to carry a choice made on the validation split alone into
the next step: the test split plays no part in it.
"""

import sys
from pathlib import Path

from lora_vision.report.collect import find_results, load_records

field, sweep = sys.argv[1], sys.argv[2]
records = [r for r in load_records(find_results([sweep])) if r.get("status") == "completed"]
if not records:
    sys.exit(f"no completed runs under {sweep}")
best = max(records, key=lambda r: r["best_val_acc1"])
print(best["lr"] if field == "lr" else Path(best["_path"]).parent)
