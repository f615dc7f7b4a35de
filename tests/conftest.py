"""
Test-wide setup. Runs before any test module imports nanochat, so every test works in a
throwaway artifact directory and nothing touches ~/.cache/nanochat or the network.
"""

import os
import tempfile

if "NANOCHAT_TEST_KEEP_BASE_DIR" not in os.environ:
    os.environ["NANOCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="nanochat_test_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
os.environ.setdefault("NANOCHAT_COMPILE", "0")  # a cold torch.compile costs ~25 s on 2 cores; test_compile turns it on
