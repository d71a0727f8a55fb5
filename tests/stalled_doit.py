"""Run doit with save_safetensors stalled, so a test can kill or interrupt it there.

    python tests/stalled_doit.py MARKER [doit arguments]

The patched safetensors writer writes part of the file, touches MARKER and sleeps.
"""

import sys
import time
from pathlib import Path

import safetensors.torch
from doit.doit_cmd import DoitMain

marker = Path(sys.argv[1])
original = safetensors.torch.save_file


def stalled_save_file(tensors, filename, metadata=None):
    original(tensors, filename, metadata=metadata)
    data = Path(filename).read_bytes()
    Path(filename).write_bytes(data[: len(data) // 2])  # a half-written file, as a kill leaves it
    marker.write_text("in save_safetensors\n")
    time.sleep(600)


safetensors.torch.save_file = stalled_save_file
sys.exit(DoitMain().run(sys.argv[2:]))
