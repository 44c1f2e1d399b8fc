"""benchmarks/gpu_suite.sh --dry-run: the GPU suite's code on the CPU with tiny settings, where `import ray`
fails, so the suite keeps running without Ray (the GPU machine has none) and its JSON keeps its shape."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_ray_env(tmp_path):
    """An environment whose `import ray` raises ImportError (a stand-in package first on PYTHONPATH)."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "PYTHON": sys.executable}
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "ray is not installed here" in probe.stderr
    return env


def run_suite(env, *args) -> dict:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@pytest.mark.slow
def test_dry_run_without_ray_prints_every_part(no_ray_env):
    out = run_suite(no_ray_env)
    assert out["dry_run"] is True and out["device"] == "cpu" and (out["width"], out["size"]) == (4, 32)
    assert is_number(out["total_s"])

    recipe = out["recipe"]
    assert "error" not in recipe, recipe
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert is_number(recipe[key]) and 0.0 <= recipe[key] <= 1.0, (key, recipe[key])
    assert is_number(recipe["train_s"]) and recipe["train_s"] > 0
    assert recipe["complete"] is True and recipe["epochs_run"] == recipe["epochs"] == 1
    assert recipe["pixel_resolution"] == "ground-truth" and recipe["n_test"] == 4

    scorer = out["scorer"]
    assert "error" not in scorer, scorer
    assert [r["batch_size"] for r in scorer["batches"]] == [2, 4]
    for row in scorer["batches"]:
        assert is_number(row["images_per_s"]) and row["images_per_s"] > 0
        assert is_number(row["fraction_of_matmul"]) and row["fraction_of_matmul"] > 0
    assert scorer["best_batch_size"] in (2, 4)
    for key in ("scorer_images_per_s", "naive_images_per_s", "ratio", "fraction_of_matmul", "bf16_matmul_tflops"):
        assert is_number(scorer[key]) and scorer[key] > 0, (key, scorer[key])
    assert scorer["compile"] is False and scorer["cuda_graphs"] is False

    train = out["train_throughput"]
    assert "error" not in train, train
    assert [r["batch_size"] for r in train["rows"]] == [2, 4]
    assert train["largest_batch"] == 4 and train["stopped"] == "largest batch tried"
    assert train["first_batch"] == 2 and is_number(train["first_batch_images_per_s"])
    assert is_number(train["largest_batch_images_per_s"])


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_others_still_run(no_ray_env, tmp_path):
    out = run_suite(no_ray_env, "--data", str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in out["recipe"]["error"]
    assert "error" not in out["scorer"] and out["scorer"]["ratio"] > 0
    assert "error" not in out["train_throughput"] and out["train_throughput"]["largest_batch"] == 4


@pytest.mark.slow
def test_the_recipe_box_stops_training_and_still_evaluates(no_ray_env):
    recipe = run_suite(no_ray_env, "--epochs", "3", "--recipe-box-s", "0")["recipe"]
    assert "error" not in recipe, recipe
    assert recipe["complete"] is False and recipe["epochs_run"] == 1 and recipe["epochs"] == 3
    assert is_number(recipe["image_auroc"]) and is_number(recipe["aupro"])


@pytest.mark.slow
def test_without_scikit_learn_only_the_recipe_fails_and_the_json_comes_last(no_ray_env, tmp_path):
    """ssm.metrics needs scikit-learn, which the GPU machine gets only from stage_gpu.sh's wheels: if they
    are missing, the recipe records the ImportError and the scorer and training parts still run."""
    blocked = tmp_path / "no_sklearn"
    (blocked / "sklearn").mkdir(parents=True)
    (blocked / "sklearn" / "__init__.py").write_text("raise ImportError('scikit-learn is not installed here')\n")
    env = {**no_ray_env, "PYTHONPATH": os.pathsep.join([str(blocked), no_ray_env["PYTHONPATH"]])}
    results = run_suite(env)
    assert "scikit-learn is not installed here" in results["recipe"]["error"]
    assert is_number(results["scorer"]["scorer_images_per_s"])
    assert is_number(results["train_throughput"]["first_batch_images_per_s"])


# Installed here but neither on the GPU machine nor staged by stage_gpu.sh: the suite must not need them.
NOT_ON_GPU_MACHINE = ("ray", "pandas", "pyarrow", "rich", "requests", "urllib3", "dateutil", "colorama", "six")
HIDE_AND_RUN = """
import importlib.machinery, runpy, sys
hidden, finder = set(sys.argv[1].split(",")), importlib.machinery.PathFinder

class Hiding:  # the path finder, blind to the hidden packages: importing them fails as if not installed
    @staticmethod
    def find_spec(name, path=None, target=None):
        return None if name.partition(".")[0] in hidden else finder.find_spec(name, path, target)

    @staticmethod
    def invalidate_caches():
        finder.invalidate_caches()

sys.meta_path[:] = [Hiding if f is finder else f for f in sys.meta_path]
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_dry_run_needs_no_package_the_gpu_machine_lacks():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", HIDE_AND_RUN, ",".join(NOT_ON_GPU_MACHINE),
                           str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [k for k, v in results.items() if isinstance(v, dict) and "error" in v], proc.stderr[-3000:]
    assert is_number(results["recipe"]["image_auroc"]) and is_number(results["scorer"]["ratio"])
