"""The baseline: convert checkpoints the way llama.cpp's one-off script did.

    python tests/benchmarks/old_script.py OUTPUT_ROOT CKPT [CKPT ...]

It unpickles the whole training checkpoint into memory (optimizer states included),
flattens it, keeps and renames the decoder's tensors in memory, then writes
model.safetensors, index.json and a config.json, one checkpoint after the other.
"""

import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["WavTokenizerDec"],
    "hidden_size": 1282,
    "n_embd_features": 512,
    "n_ff": 2304,
    "vocab_size": 4096,
    "n_head": 1,
    "layer_norm_epsilon": 1e-06,
    "group_norm_epsilon": 1e-06,
    "group_norm_groups": 32,
    "max_position_embeddings": 8192,
    "n_layer": 12,
    "posnet": {"n_embd": 768, "n_layer": 6},
    "convnext": {"n_embd": 768, "n_layer": 12},
}


def flatten(tree, prefix=""):
    items = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            items[name] = value
        elif isinstance(value, dict):
            items.update(flatten(value, name))
    return items


def convert(source: Path, folder: Path) -> None:
    # The old script's call, as is: on torch 2.6 and newer it uses the weights-only
    # unpickler by default.
    checkpoint = torch.load(source, map_location="cpu")
    out = {}
    for key, value in flatten(checkpoint).items():
        if not key.startswith(
            (
                "state_dict.feature_extractor.encodec.quantizer.",
                "state_dict.backbone.",
                "state_dict.head.out",
            )
        ):
            continue
        name = key.replace("state_dict.", "").replace("pos_net", "posnet")
        match = re.match(r"backbone\.posnet\.(\d+)\.(bias|weight)$", name)
        if match:
            name = f"backbone.posnet.{match.group(1)}.norm.{match.group(2)}"
        if name == "feature_extractor.encodec.quantizer.vq.layers.0._codebook.embed":
            name = "backbone.embedding.weight"
        elif name.startswith("feature_extractor."):
            continue
        if name.endswith("norm.scale.weight"):
            name, value = name.replace("norm.scale.weight", "norm.weight"), value[0]
        if name.endswith("norm.shift.weight"):
            name, value = name.replace("norm.shift.weight", "norm.bias"), value[0]
        if name.endswith("gamma"):
            name = name + ".weight"
        if (
            name.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".bias"))
            and name.startswith(("backbone.posnet", "backbone.embed.bias"))
        ) or name.endswith("dwconv.bias"):
            value = value.unsqueeze(1)
        out[name] = value.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    size = os.path.getsize(folder / "model.safetensors")
    (folder / "index.json").write_text(
        json.dumps({"total_size": size, "weight_map": {"model.safetensors": ["*"]}}, indent=4)
    )
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=4))
    del checkpoint, out


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for path in map(Path, sys.argv[2:]):
        convert(path, root / path.stem)
