#!/usr/bin/env bash
# Prints the PyTorch CUDA wheel index that fits this node's NVIDIA driver (dev/install.sh uses it
# unless TORCH_INDEX_URL is set). torch 2.9.1 comes built for CUDA 12.6, 12.8 and 13.0; we use 12.8,
# the build upstream's runs and the hub's Hopper FA3 kernel were made for, whenever the driver runs it
# (a CUDA 13 driver runs CUDA 12 builds), and 12.6 on drivers for CUDA 12.0-12.7, whose minor-version
# compatibility runs it. Older drivers cannot run torch 2.9.1 at all: that is an error saying so.
#
#   bash dev/torch_index.sh        # e.g. https://download.pytorch.org/whl/cu128
set -euo pipefail
cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
if [ -z "$cuda" ]; then
    echo "cannot read the driver's CUDA version from nvidia-smi; set TORCH_INDEX_URL to a PyTorch wheel index" >&2
    exit 1
fi
major=${cuda%%.*}
minor=${cuda#*.}
if [ "$major" -gt 12 ] || { [ "$major" -eq 12 ] && [ "$minor" -ge 8 ]; }; then
    flavor=cu128
elif [ "$major" -eq 12 ]; then
    flavor=cu126
else
    echo "the NVIDIA driver supports CUDA $cuda, but torch 2.9.1 needs a driver for CUDA 12 or newer (R525+):" \
         "upgrade the driver, or set TORCH_INDEX_URL to a wheel index whose torch runs on it" >&2
    exit 1
fi
echo "https://download.pytorch.org/whl/$flavor"
