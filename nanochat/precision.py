"""
-d/--dtype, the compute-dtype flag of chat_cli, chat_eval, chat_web, mid_train, chat_sft and chat_rl.
nanochat.common fixes the compute dtype at import from NANOCHAT_DTYPE, so these scripts call
apply_dtype_flag(sys.argv[1:]) before they import anything else of nanochat: the flag then sets
NANOCHAT_DTYPE for the process exactly as the environment variable does. This module imports
neither torch nor the rest of nanochat.
"""

import os

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def _flag_value(argv):
    for index, arg in enumerate(argv):
        if arg in ("-d", "--dtype") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--dtype="):
            return arg.split("=", 1)[1]
    return None


def apply_dtype_flag(argv):
    """NANOCHAT_DTYPE from -d/--dtype in argv, when it names a dtype (argparse rejects the rest later)."""
    value = _flag_value(argv)
    if value in DTYPE_NAMES:
        os.environ["NANOCHAT_DTYPE"] = value


def add_dtype_flag(parser):
    parser.add_argument("-d", "--dtype", type=str, default="", choices=["", *DTYPE_NAMES],
                        help="compute dtype of this process, as NANOCHAT_DTYPE sets it (empty = NANOCHAT_DTYPE, "
                             "else bf16 on SM80+ GPUs and fp32 elsewhere)")


def check_dtype_flag(name):
    """A script's main called in-process with -d after nanochat was imported cannot change the dtype: say so."""
    from nanochat.common import COMPUTE_DTYPE, ConfigError

    current = str(COMPUTE_DTYPE).removeprefix("torch.")
    if name and name != current:
        raise ConfigError(f"-d {name}: this process already computes in {current} (the dtype is fixed when nanochat "
                          f"is imported); start it with -d {name} on the command line or NANOCHAT_DTYPE={name}")
