"""
-d/--dtype sets the process's compute dtype as NANOCHAT_DTYPE does: applied from the command line
before nanochat.common fixes the dtype at import, in every script that has the flag.
"""

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from nanochat.common import COMPUTE_DTYPE, ConfigError
from nanochat.precision import apply_dtype_flag, check_dtype_flag

SCRIPTS_WITH_DTYPE = ["chat_cli", "chat_eval", "chat_web", "mid_train", "chat_sft", "chat_rl"]


@pytest.mark.parametrize("argv, expected", [(["-d", "bfloat16"], "bfloat16"), (["--dtype=float16"], "float16"),
                                            (["--dtype", "float32", "-i", "sft"], "float32"), (["-i", "sft"], "bfloat16")])
def test_the_flag_sets_nanochat_dtype_over_the_environment(monkeypatch, argv, expected):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    apply_dtype_flag(argv)
    assert os.environ["NANOCHAT_DTYPE"] == expected


def test_a_process_that_applies_the_flag_first_computes_in_that_dtype():
    program = ("import sys; from nanochat.precision import apply_dtype_flag; apply_dtype_flag(sys.argv[1:]); "
               "from nanochat.common import COMPUTE_DTYPE; print(COMPUTE_DTYPE)")
    env = dict(os.environ, NANOCHAT_DTYPE="float32")
    result = subprocess.run([sys.executable, "-c", program, "-d", "bfloat16"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True)
    assert result.stdout.strip() == "torch.bfloat16", result.stderr


@pytest.mark.parametrize("script", SCRIPTS_WITH_DTYPE)
def test_each_script_applies_the_flag_before_it_imports_the_rest_of_nanochat(script):
    tree = ast.parse(open(os.path.join(REPO_ROOT, "scripts", f"{script}.py")).read())
    order = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("nanochat", "scripts", "tasks"):
            order.append(node.module)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "apply_dtype_flag":
            order.append("apply_dtype_flag()")
    assert order[:2] == ["nanochat.precision", "apply_dtype_flag()"], order
    source = open(os.path.join(REPO_ROOT, "scripts", f"{script}.py")).read()
    assert "add_dtype_flag(parser)" in source or "phase_parser(" in source  # and the flag is in its --help


def test_a_dtype_other_than_the_process_has_cannot_be_taken_in_process():
    current = str(COMPUTE_DTYPE).removeprefix("torch.")
    check_dtype_flag(current)
    check_dtype_flag("")
    other = "bfloat16" if current != "bfloat16" else "float32"
    with pytest.raises(ConfigError, match=f"start it with -d {other}"):
        check_dtype_flag(other)
