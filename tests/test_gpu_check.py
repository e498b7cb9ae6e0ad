"""The GPU check runs at its tiny size on the CPU in CI, so that it works the day a GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
FIGURES = [
    "llm_forward_img_per_s",
    *(
        f"{sid}_{what}"
        for sid in ("b1", "s2", "fusedit")
        for what in ("train_img_per_s", "mfu_vs_measured_matmul")
    ),
    "s2_sample_img_per_s_eager",
    "s2_sample_img_per_s_compiled",
    "run_loss_falls",
    "run_resume_matches",
]


def test_the_gpu_check_runs_at_tiny_size_and_prints_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    missing = [name for name in FIGURES if name not in lines]
    assert not missing, done.stdout
    assert lines["run_loss_falls"].split()[1] == "yes" and lines["run_resume_matches"].split()[1] == "yes"
    results = json.loads(out.read_text())
    for sid in ("b1", "s2", "fusedit"):
        figure = results[sid]
        assert figure["img_per_s"] > 0 and figure["flops_per_img"] > 0 and 0 < figure["mfu_measured"] < 1
    # Deep fusion has no cross-attention and no context projection: fewer FLOPs than S2 at these shapes.
    assert results["fusedit"]["flops_per_img"] < results["s2"]["flops_per_img"]
    assert results["run"]["steps"] == 6 and results["run"]["resume_diff"] == 0  # bitwise on the CPU
