"""settings.py: every flag's range checked up front with the flag named, and --help, flag
mistakes and a Python without the dependencies all answered without importing TensorFlow."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

import build_binary_classifier
import build_multi_hot_model
from symbol_trainer import settings
from conftest import ROOT, run_script
from symbol_trainer.errors import InputError

SCRIPTS = ["build_binary_classifier.py", "build_multi_hot_model.py"]


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "100000"], "--image-size must be a whole number of pixels from 32 to 2048; got 100000"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295; got -1"),
    (["--seed", "4294967296"], "--seed must be a whole number from 0 to 4294967295; got 4294967296"),
    (["--learning-rate", "inf"], "--learning-rate must be a number above 0 and at most 1"),
    (["--learning-rate", "nan"], "--learning-rate must be a number above 0 and at most 1"),
    (["--fine-tune-learning-rate", "1e30"], "--fine-tune-learning-rate must be a number above 0"),
    (["--batch-size", "1000000000"], "--batch-size must be a whole number from 1 to 4096"),
    (["--epochs", "99999999"], "--epochs must be a whole number from 1 to 10000"),
    (["--fine-tune-epochs", "-1"], "--fine-tune-epochs must be a whole number from 0 to 10000"),
    (["--patience", "0"], "--patience must be a whole number from 1 to 10000"),
    (["--focal-gamma", "6"], "--focal-gamma must be a number from 0 to 5 (2 is the usual focal setting); got 6"),
    (["--focal-gamma", "nan"], "--focal-gamma must be a number from 0 to 5"),
    (["--dropout", "nan"], "--dropout must be at least 0 and below 1"),
    (["--fine-tune-fraction", "nan"], "--fine-tune-fraction must be greater than 0 and at most 1"),
    (["--decoded-cache-gb", "inf"], "--decoded-cache-gb must be a number of GB, 0 or more"),
    (["--validation-split", "nan"], "--validation-split must be greater than 0 and at most 0.5"),
    (["--max-unreadable", "-0.1"], "--max-unreadable must be between 0 and 1"),
    (["--alpha", "nan"], "--alpha must be a number above 0"),
])
def test_out_of_range_flags_exit_2_naming_the_flag_before_any_work(tmp_path, capsys, flags, message):
    # The folders do not even exist: the flag is checked before anything is read.
    out = tmp_path / "model"
    code = run_script(build_binary_classifier,
                      [tmp_path / "with_x", tmp_path / "without_x", out, *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert code == 2 and len(errors) == 1, errors
    assert message in errors[0]
    assert not out.exists() and not (tmp_path / "model.partial").exists()


def test_defaults_are_inside_their_ranges():
    settings.TrainingConfig()  # raises if a default broke its own rule


def test_an_int_setting_refuses_a_bool_and_a_float():
    with pytest.raises(InputError, match="--seed"):
        settings.TrainingConfig(seed=True)
    with pytest.raises(InputError, match="--epochs"):
        settings.TrainingConfig(epochs=2.5)


PROBE = """
import sys, time
sys.path.insert(0, {root!r})
started = time.perf_counter()
import {module}
parser = {module}.build_parser()
try:
    parser.parse_args(["--help"])
except SystemExit:
    pass
heavy = sorted(name for name in ("tensorflow", "keras", "numpy", "pandas", "PIL") if name in sys.modules)
print("HEAVY", ",".join(heavy), "SECONDS", time.perf_counter() - started, file=sys.stderr)
"""


@pytest.mark.parametrize("module", ["build_binary_classifier", "build_multi_hot_model"])
def test_help_imports_neither_tensorflow_nor_numpy(module):
    result = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), module=module)],
                            capture_output=True, text=True, timeout=60)
    assert "usage:" in result.stdout and "--learning-rate" in result.stdout
    heavy, seconds = re.search(r"HEAVY (\S*) SECONDS (\S+)", result.stderr).groups()
    assert heavy == ""
    # Without those imports --help takes milliseconds; a loaded CI machine gets a margin.
    assert float(seconds) < 1.0


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_python_without_the_dependencies_gets_one_line_and_exit_2(tmp_path, script):
    # `-S` leaves site-packages out: this Python has no numpy, pandas, TensorFlow or Keras.
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / script), str(tmp_path / "in" / "a"),
         str(tmp_path / "in" / "b"), str(tmp_path / "model")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "lacks numpy" in lines[0] and "tensorflow" in lines[0]
    assert "-m pip install -r" in lines[0] and "requirements.txt" in lines[0]
    assert time.perf_counter() - started < 30
    # --help still works there, and a flag mistake is still named before the packages.
    help_result = subprocess.run([sys.executable, "-S", str(ROOT / script), "--help"],
                                 capture_output=True, text=True, timeout=60)
    assert help_result.returncode == 0 and "OUTPUT_MODEL_DIR" in help_result.stdout
    flag_result = subprocess.run([sys.executable, "-S", str(ROOT / script), "a", "b", "c",
                                  "--seed", "-1"], capture_output=True, text=True, timeout=60)
    assert flag_result.returncode == 2 and "--seed must be" in flag_result.stderr


def test_predict_without_the_dependencies_gets_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-S", str(ROOT / "predict.py"), str(tmp_path),
                             str(tmp_path / "a.jpg")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "lacks numpy" in result.stderr and " av" in result.stderr


def test_flag_errors_do_not_import_tensorflow(tmp_path):
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import build_multi_hot_model as m; "
             f"code = m.main([{str(tmp_path)!r}, 'x.csv', 'out', '--seed', '-1']); "
             "print(code, 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "--seed must be a whole number" in result.stderr


def test_multi_hot_script_checks_its_flags_too(tmp_path, capsys):
    code = run_script(build_multi_hot_model, [tmp_path, tmp_path / "labels.csv",
                                              tmp_path / "model", "--image-size", "100000"])
    assert code == 2 and "--image-size must be" in capsys.readouterr().err
