"""A whole conversion of a scaled-down checkpoint, checked tensor by tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline import synthetic
from pipeline.cli import convert

CODEBOOK = "feature_extractor.encodec.quantizer.vq.layers.0._codebook.embed"


def expected_outputs(
    state_dict: dict, bandwidth: int, blocks: int = 12
) -> dict[str, torch.Tensor]:
    """The output the rules promise, written out block by block as llama.cpp reads it."""
    sd = state_dict
    column = lambda t: t.reshape(-1, 1)  # noqa: E731 - a one-line helper of this oracle
    out = {
        "backbone.embedding.weight": sd[CODEBOOK],
        "backbone.embed.weight": sd["backbone.embed.weight"],
        "backbone.embed.bias": column(sd["backbone.embed.bias"]),
        "backbone.norm.weight": sd["backbone.norm.scale.weight"][bandwidth],
        "backbone.norm.bias": sd["backbone.norm.shift.weight"][bandwidth],
        "backbone.final_layer_norm.weight": sd["backbone.final_layer_norm.weight"],
        "backbone.final_layer_norm.bias": sd["backbone.final_layer_norm.bias"],
        "head.out.weight": sd["head.out.weight"],
        "head.out.bias": sd["head.out.bias"],
    }
    for n in range(blocks):
        src, dst = f"backbone.convnext.{n}", f"backbone.convnext.{n}"
        out[f"{dst}.dwconv.weight"] = sd[f"{src}.dwconv.weight"]
        out[f"{dst}.dwconv.bias"] = column(sd[f"{src}.dwconv.bias"])
        out[f"{dst}.norm.weight"] = sd[f"{src}.norm.scale.weight"][bandwidth]
        out[f"{dst}.norm.bias"] = sd[f"{src}.norm.shift.weight"][bandwidth]
        out[f"{dst}.gamma.weight"] = sd[f"{src}.gamma"]
        for part in ("pwconv1.weight", "pwconv1.bias", "pwconv2.weight", "pwconv2.bias"):
            out[f"{dst}.{part}"] = sd[f"{src}.{part}"]
    for n in (0, 1, 3, 4):
        for part in ("norm1", "norm2"):
            out[f"backbone.posnet.{n}.{part}.weight"] = column(
                sd[f"backbone.pos_net.{n}.{part}.weight"]
            )
            out[f"backbone.posnet.{n}.{part}.bias"] = column(
                sd[f"backbone.pos_net.{n}.{part}.bias"]
            )
        for part in ("conv1", "conv2"):
            out[f"backbone.posnet.{n}.{part}.weight"] = sd[f"backbone.pos_net.{n}.{part}.weight"]
            out[f"backbone.posnet.{n}.{part}.bias"] = column(
                sd[f"backbone.pos_net.{n}.{part}.bias"]
            )
    for part in ("norm", "q", "k", "v", "proj_out"):
        weight = sd[f"backbone.pos_net.2.{part}.weight"]
        out[f"backbone.posnet.2.{part}.weight"] = column(weight) if part == "norm" else weight
        out[f"backbone.posnet.2.{part}.bias"] = column(sd[f"backbone.pos_net.2.{part}.bias"])
    out["backbone.posnet.5.norm.weight"] = column(sd["backbone.pos_net.5.weight"])
    out["backbone.posnet.5.norm.bias"] = column(sd["backbone.pos_net.5.bias"])
    return out


TINY_CONFIG = {
    "architectures": ["WavTokenizerDec"],
    "hidden_size": 82,
    "n_embd_features": 32,
    "n_ff": 192,
    "vocab_size": 256,
    "n_head": 1,
    "layer_norm_epsilon": 1e-06,
    "group_norm_epsilon": 1e-06,
    "group_norm_groups": 32,
    "max_position_embeddings": 8192,
    "n_layer": 12,
    "posnet": {"n_embd": 64, "n_layer": 6},
    "convnext": {"n_embd": 64, "n_layer": 12},
}


@pytest.mark.parametrize("bandwidth", [0, 2])
def test_tiny_conversion_is_exact(tmp_path, tiny_path, tiny_checkpoint, bandwidth):
    assert convert(tiny_path, tmp_path, bandwidth, trusted=False) == 0

    written = load_file(tmp_path / "model.safetensors")
    expected = expected_outputs(tiny_checkpoint["state_dict"], bandwidth)
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == torch.float32, name
        assert written[name].shape == tensor.shape, name
        assert torch.equal(written[name], tensor), name

    assert json.loads((tmp_path / "config.json").read_text()) == TINY_CONFIG
    size = (tmp_path / "model.safetensors").stat().st_size
    assert (tmp_path / "index.json").read_text() == (
        '{\n    "total_size": %d,\n    "weight_map": {\n        "model.safetensors": [\n'
        '            "*"\n        ]\n    }\n}\n' % size
    )


def test_header_records_source_and_converter(tmp_path, tiny_path):
    import hashlib

    assert convert(tiny_path, tmp_path, 0, trusted=False) == 0
    with safe_open(tmp_path / "model.safetensors", framework="pt") as file:
        assert file.metadata() == {
            "format": "pt",
            "source": "tiny.ckpt",
            "source_sha256": hashlib.sha256(tiny_path.read_bytes()).hexdigest(),
            "converter": "wavtokenizer-pipeline 0.1.0",
        }
    header = (tmp_path / "model.safetensors").read_bytes()[8:200]
    assert header.startswith(
        b'{"__metadata__":{"converter":"wavtokenizer-pipeline 0.1.0",'
        b'"format":"pt","source":"tiny.ckpt","source_sha256":"'
    )


def test_half_precision_stays_half(tmp_path):
    source = synthetic.write_tiny(tmp_path / "half.ckpt", dtype=torch.bfloat16, optimizer=False)
    assert convert(source, tmp_path / "out", 0, trusted=False) == 0
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert {tensor.dtype for tensor in written.values()} == {torch.bfloat16}


def test_two_conversions_are_byte_identical(tmp_path, tiny_path):
    for folder in ("a", "b"):
        assert (
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "convert",
                    str(tiny_path),
                    "--output",
                    str(tmp_path / folder),
                ],
                capture_output=True,
            ).returncode
            == 0
        )
    for name in ("model.safetensors", "index.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    first, second = (json.loads((tmp_path / f / "provenance.json").read_text()) for f in "ab")
    first["entry"].pop("output"), second["entry"].pop("output")
    first.pop("converted_at"), second.pop("converted_at")
    assert first == second


def test_command_line_writes_beside_a_bare_file_name(tmp_path):
    synthetic.write_tiny(tmp_path / "model.ckpt")
    result = subprocess.run(
        ["convert-pt-to-hf", "model.ckpt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "index.json",
        "model.ckpt",
        "model.safetensors",
        "provenance.json",
    ]
    assert "model save_safetensors: wrote" in result.stderr


def test_full_size_release_matches_the_reference(tmp_path, reference):
    """The real layout at full size (about 2 GB): names, shapes and config.json."""
    source = synthetic.write_release(tmp_path / "large.ckpt")
    assert convert(source, tmp_path / "out", 0, trusted=False) == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as file:
        found = sorted(
            [name, list(file.get_slice(name).get_shape()), file.get_slice(name).get_dtype()]
            for name in file.keys()
        )
    assert found == sorted(reference["model.safetensors"])
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == reference["config.json"]
