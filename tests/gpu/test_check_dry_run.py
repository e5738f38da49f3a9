"""The GPU check script's dry run works on any machine: it lists every check it would run."""
import subprocess
import sys
from pathlib import Path


def test_the_dry_run_lists_a_step_per_method_and_dtype_the_two_epoch_runs_and_two_gpus():
    script = Path(__file__).with_name("check.py")
    done = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, check=True)
    count = "from bench.registry import list_methods; print(len([m for m in list_methods() if not m.startswith('_')]))"
    methods = int(subprocess.run([sys.executable, "-c", count], capture_output=True, text=True, check=True).stdout)
    assert f"{2 * methods + 4} tests would run" in done.stdout  # counted in a fresh process: no test's plugins
    assert "test_paper_preset_steps_under_autocast[video_ct_mae-float16]" in done.stdout
    assert "test_two_paper_preset_epochs_lower_the_training_loss[resnet18]" in done.stdout
    assert "test_two_gpus_take_the_one_gpu_steps" in done.stdout  # run where two GPUs exist, skipped elsewhere
    assert "test_a_suite_spans_each_run_over_two_gpus" in done.stdout
