"""Calibration of the issue-20 CPU setting on vanilla and kd only (not committed)."""
import sys, json, torch
from kdbench import settings
from kdbench.settings import Setting, Recipe
from kdbench.store import Store
from kdbench.spec import RunSpec, TEACHER
from kdbench.worker import run_job
name = sys.argv[1]; teacher, student, subset, t_epochs, s_epochs = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
seeds = [int(s) for s in sys.argv[7].split(",")]
student_recipe = Recipe(epochs=s_epochs, batch_size=64, lr=0.05, lr_decay_at=(0.5, 0.75))
teacher_recipe = Recipe(epochs=t_epochs, batch_size=64, lr=0.05, lr_decay_at=(0.5, 0.75), eval_every=t_epochs)
settings.SETTINGS[name] = Setting(name, "fashion_mnist", teacher, student, student_recipe, teacher_recipe,
                                  "calibration", train_subset=subset, pretrain_scale=0.1)
results = f"/work/calib/results-{name.replace('/', '_')}"
torch.set_num_threads(1)
opts = {"threads": 1}
t = RunSpec(name, "vanilla", 0, role=TEACHER)
print(run_job(t.to_json(), results, opts), flush=True)
for method in ("vanilla", "kd"):
    for seed in seeds:
        s = RunSpec(name, method, seed)
        print(method, seed, run_job(s.to_json(), results, opts), flush=True)
for path in sorted(Store(results).runs_dir.glob("*.json")):
    r = json.loads(path.read_text())
    print(r["spec"]["method"], r["spec"]["role"], r["spec"]["seed"], [round(h.get("top1", float("nan")), 2) for h in r["history"] if "top1" in h])
