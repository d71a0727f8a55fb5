"""Loading checkpoints from many hands: safely, leanly, and with clear errors."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from pipeline import synthetic
from pipeline.checkpoint import find_state_dict, open_checkpoint, sniff
from pipeline.cli import convert
from pipeline.errors import CheckpointError
from tests.test_conversion import expected_outputs


def converted(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def tiny(**options) -> dict:
    return synthetic.build_checkpoint(synthetic.TINY, shrink=16, **options)


# Safety


class EMACallback:
    def __init__(self, decay: float) -> None:
        self.decay = decay


class DictConfig:
    def __init__(self, content: dict) -> None:
        self._content = content

    def __getstate__(self) -> dict:
        return {"_content": self._content}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def test_foreign_objects_get_placeholders_and_a_warning_each(tmp_path, messages):
    with (
        synthetic.foreign_module("wavtokenizer_train.callbacks", EMACallback=EMACallback),
        synthetic.foreign_module("omegaconf.dictconfig", DictConfig=DictConfig),
    ):
        checkpoint = tiny(optimizer=False)
        checkpoint["hyper_parameters"]["resume_path"] = pathlib.PosixPath("/data/runs/last.ckpt")
        checkpoint["hyper_parameters"]["config"] = DictConfig({"lr": 2e-4})
        checkpoint["hyper_parameters"]["args"] = argparse.Namespace(seed=3)
        checkpoint["callbacks"]["EMACallback"] = EMACallback(0.999)
        source = synthetic.write_checkpoint(tmp_path / "foreign.ckpt", checkpoint)
    assert "wavtokenizer_train" not in sys.modules

    assert convert(source, tmp_path / "out", 0, trusted=False) == 0

    warned = sorted(m for level, m in messages if level == "WARNING")
    assert [m.split(" is not allowed")[0] for m in warned] == [
        "foreign.ckpt: argparse.Namespace",
        "foreign.ckpt: omegaconf.dictconfig.DictConfig",
        "foreign.ckpt: pathlib.PosixPath",
        "foreign.ckpt: wavtokenizer_train.callbacks.EMACallback",
    ]
    loaded = open_checkpoint(source)
    callback = loaded.content["callbacks"]["EMACallback"]
    assert type(callback).__module__ == "wavtokenizer_train.callbacks"
    assert callback.placeholder_state == {"decay": 0.999}
    assert "wavtokenizer_train" not in sys.modules and "omegaconf" not in sys.modules
    assert torch.equal(
        converted(tmp_path / "out")["head.out.weight"], checkpoint["state_dict"]["head.out.weight"]
    )


class RunsOsSystem:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsExec:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class RunsSubprocess:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


class ImportsOs:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return __import__, ("os",)


@pytest.mark.parametrize(
    "payload, named",
    [
        (RunsOsSystem, "posix.system"),
        (RunsExec, "builtins.exec"),
        (RunsSubprocess, "commands.call"),
        (ImportsOs, "builtins.__import__"),
    ],
)
def test_code_in_a_pickle_is_never_run(tmp_path, payload, named, messages):
    marker = tmp_path / "side-effect"
    checkpoint = tiny(optimizer=False)
    checkpoint["hyper_parameters"]["payload"] = payload(marker)
    source = synthetic.write_checkpoint(tmp_path / "evil.ckpt", checkpoint)

    assert convert(source, tmp_path / "out", 0, trusted=False) == 1

    assert not marker.exists()
    assert (
        f"{source}: refused: its pickle calls {named}, which would run code on this "
        "machine; the file may be malicious and was not loaded"
    ) in [m for _, m in messages]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def weights_only_calls(monkeypatch) -> list:
    """The weights_only argument of every torch.load call the test makes."""
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_default_load_is_weights_only(tmp_path, tiny_path, weights_only_calls):
    assert convert(tiny_path, tmp_path, 0, trusted=False) == 0
    # save_safetensors maps what load located: it unpickles nothing
    assert weights_only_calls == [True]


def test_trusted_loads_fully_with_a_warning(tmp_path, tiny_path, weights_only_calls, messages):
    assert convert(tiny_path, tmp_path, 0, trusted=True) == 0
    assert weights_only_calls == [False]
    assert (
        "WARNING",
        "tiny.ckpt: trusted = true: loading with the full pickle loader, "
        "which runs any code the file holds",
    ) in messages


def test_loader_needs_no_lightning(tiny_path):
    code = (
        "import sys, pathlib; sys.modules['pytorch_lightning'] = None; "
        "sys.modules['lightning'] = None; "
        "from pipeline.checkpoint import open_checkpoint, find_state_dict; "
        f"loaded = open_checkpoint(pathlib.Path({str(tiny_path)!r})); "
        "print(find_state_dict(loaded.content, loaded.path)[0])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['state_dict']"


# Lean


def mapped_ranges(path: pathlib.Path) -> list[range]:
    """Address ranges where this process maps the file, from /proc/self/maps."""
    ranges = []
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(" " + str(path)):
            start, end = line.split()[0].split("-")
            ranges.append(range(int(start, 16), int(end, 16)))
    return ranges


def test_zip_checkpoints_are_memory_mapped(tiny_path):
    """Every tensor, optimizer states included, is a view of the mapped file: none is copied."""
    loaded = open_checkpoint(tiny_path)
    ranges = mapped_ranges(tiny_path)
    exp_avg = loaded.content["optimizer_states"][0]["state"][0]["exp_avg"]
    discriminator = loaded.content["state_dict"]["multiperioddisc.discriminators.0.convs.0.bias"]
    assert loaded.format == "zip" and ranges
    for tensor in (loaded.content["state_dict"]["head.out.weight"], exp_avg, discriminator):
        assert any(tensor.data_ptr() in mapped for mapped in ranges)


def test_legacy_files_fall_back_to_a_normal_load(tmp_path, messages):
    checkpoint = tiny(optimizer=False)
    source = synthetic.write_checkpoint(tmp_path / "legacy.ckpt", checkpoint, legacy=True)
    assert sniff(source) == "legacy"
    assert convert(source, tmp_path / "out", 0, trusted=False) == 0
    assert (
        "INFO",
        "legacy.ckpt: legacy (pre-zip) serialization: cannot be memory-mapped, "
        "reading the whole file",
    ) in messages
    expected = expected_outputs(checkpoint["state_dict"], 0)
    assert all(torch.equal(converted(tmp_path / "out")[n], t) for n, t in expected.items())


def test_tensors_saved_on_a_gpu_load_on_the_cpu(tmp_path):
    checkpoint = tiny(optimizer=False)
    fake_gpu = (0, lambda storage: "cuda:0", lambda storage, location: None)
    torch.serialization.register_package(*fake_gpu)
    try:
        source = synthetic.write_checkpoint(tmp_path / "gpu.ckpt", checkpoint)
    finally:
        torch.serialization._package_registry[:] = [
            entry for entry in torch.serialization._package_registry if entry[0] != 0
        ]
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(source, weights_only=True)
    assert convert(source, tmp_path / "out", 0, trusted=False) == 0
    assert torch.equal(
        converted(tmp_path / "out")["backbone.embed.weight"],
        checkpoint["state_dict"]["backbone.embed.weight"],
    )


# Where the state dict is


def prefixed(state_dict: dict, prefix: str) -> OrderedDict:
    return OrderedDict((prefix + name, tensor) for name, tensor in state_dict.items())


LAYOUTS = {
    "lightning, keys reordered": lambda c: dict(reversed(list(c.items()))),
    "bare state dict": lambda c: c["state_dict"],
    "under model": lambda c: {"model": c["state_dict"], "epoch": 3},
    "under generator, nested": lambda c: {
        "meta": {"step": 1},
        "generator": {"weights": c["state_dict"]},
    },
    "DDP module. prefix": lambda c: {**c, "state_dict": prefixed(c["state_dict"], "module.")},
    "model. prefix": lambda c: {"state_dict": prefixed(c["state_dict"], "model.")},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_is_found_wherever_it_is(tmp_path, layout):
    checkpoint = tiny(optimizer=False)
    source = synthetic.write_checkpoint(tmp_path / "x.ckpt", LAYOUTS[layout](checkpoint))
    assert convert(source, tmp_path / "out", 0, trusted=False) == 0
    expected = expected_outputs(checkpoint["state_dict"], 0)
    written = converted(tmp_path / "out")
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[n], t) for n, t in expected.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_kept(tmp_path, dtype):
    source = synthetic.write_checkpoint(tmp_path / "half.ckpt", tiny(dtype=dtype, optimizer=False))
    assert convert(source, tmp_path / "out", 0, trusted=False) == 0
    assert {t.dtype for t in converted(tmp_path / "out").values()} == {dtype}


def test_no_state_dict_lists_what_is_there(tmp_path):
    source = tmp_path / "other.ckpt"
    torch.save(
        {
            "epoch": 1,
            "weights": {
                "encoder.conv.weight": torch.zeros(2),
                "encoder.conv.bias": torch.zeros(2),
            },
        },
        source,
    )
    loaded = open_checkpoint(source)
    with pytest.raises(CheckpointError) as error:
        find_state_dict(loaded.content, source)
    assert str(error.value) == (
        f"{source}: no WavTokenizer state dict found (no backbone.* or head.out.* tensors). "
        "Top-level keys: 'epoch', 'weights'; tensor names seen: weights.encoder.conv.weight, "
        "weights.encoder.conv.bias"
    )


def test_load_logs_kept_and_dropped(tmp_path, tiny_path, messages):
    assert convert(tiny_path, tmp_path, 0, trusted=False) == 0
    assert (
        "INFO",
        "state dict at 'state_dict': kept 161 of 1091 tensors (1.7 MiB), dropped "
        "930: 800 discriminator (training only); 62 audio encoder (not used to decode); "
        "62 EnCodec's own decoder (the backbone decodes instead); 3 codebook training "
        "statistics (llama.cpp skips them); 2 loss buffer (training only); 1 fixed STFT "
        "window (llama.cpp builds its own)",
    ) in messages


# Audit


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda sd: sd.__setitem__("backbone.convnext.0.extra.weight", torch.zeros(3)),
            "1 tensor(s) in the decoder's scope match no conversion rule: "
            "'backbone.convnext.0.extra.weight'; the checkpoint is not a WavTokenizer decoder "
            "this converter knows",
        ),
        (lambda sd: sd.pop("head.out.weight"), "required tensor(s) missing: 'head.out.weight'"),
        (
            lambda sd: sd.__setitem__("backbone.convnext.4.pwconv2.weight", torch.zeros(64, 100)),
            "tensor shape(s) disagree with the rest of the decoder: "
            "backbone.convnext.4.pwconv2.weight "
            "is [64, 100], expected [64, 192]",
        ),
    ],
)
def test_audit_names_the_tensor(tmp_path, change, message, messages):
    checkpoint = tiny(optimizer=False)
    change(checkpoint["state_dict"])
    source = synthetic.write_checkpoint(tmp_path / "odd.ckpt", checkpoint)
    assert convert(source, tmp_path / "out", 0, trusted=False) == 1
    assert ("ERROR", f"{source}: {message}") in messages


# Bad files


BAD_FILES = {
    "empty": (b"", "the file is empty (0 bytes); the copy or download that made it failed"),
    "lfs": (
        b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1995604300\n",
        "is a Git LFS pointer (75 bytes), not the checkpoint; fetch the real file with "
        "`git lfs pull`",
    ),
    "html": (
        b"\n<!DOCTYPE html><html><body>Access denied</body></html>",
        "is an HTML page, not a checkpoint (a login or error page saved by a failed "
        "download?); download it again",
    ),
    "text": (
        b"model weights will be uploaded later\n",
        "is a text file, not a checkpoint (it starts with 'model weights will be uploaded later')",
    ),
    "binary": (
        bytes(range(200, 256)) * 3,
        "is not a PyTorch checkpoint (it starts with bytes c8 c9 ca cb cc cd ce cf)",
    ),
    "pickle": (
        b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
        "is a Python pickle but was not written by torch.save; it is not a PyTorch checkpoint",
    ),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_gets_its_own_error_before_torch(tmp_path, kind, monkeypatch):
    data, message = BAD_FILES[kind]
    path = tmp_path / f"{kind}.ckpt"
    path.write_bytes(data)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was asked"))
    with pytest.raises(CheckpointError) as error:
        sniff(path)
    assert str(error.value) == f"{path}: {message}"


def test_truncated_download(tmp_path, tiny_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(tiny_path.read_bytes()[:1_000_000])
    with pytest.raises(CheckpointError) as error:
        sniff(path)
    assert str(error.value) == (
        f"{path}: is truncated or damaged (File is not a zip file); "
        "the download or copy probably stopped early; fetch it again"
    )


def test_safetensors_file_given_as_checkpoint(tmp_path, tiny_path):
    convert(tiny_path, tmp_path, 0, trusted=False)
    with pytest.raises(CheckpointError, match="is a safetensors file, not a training checkpoint"):
        sniff(tmp_path / "model.safetensors")


def test_an_object_the_unpickler_cannot_rebuild_points_to_trusted(tmp_path, messages):
    import collections

    checkpoint = tiny(optimizer=False)
    checkpoint["hyper_parameters"]["counts"] = collections.defaultdict(list, {"a": [1]})
    source = synthetic.write_checkpoint(tmp_path / "dd.ckpt", checkpoint)
    assert convert(source, tmp_path / "out", 0, trusted=False) == 1
    errors = [m for level, m in messages if level == "ERROR"]
    assert errors[0] == (
        f"{source}: the weights-only loader cannot rebuild an object in it (Can only SETITEM "
        "for dict, collections.OrderedDict, collections.Counter, but got <class "
        "'collections.defaultdict'>); if the team vouches for this file, set trusted = true "
        "on its config entry"
    )


def test_a_sparse_decoder_tensor_is_named(tmp_path, messages):
    checkpoint = tiny(optimizer=False)
    checkpoint["state_dict"]["head.out.weight"] = checkpoint["state_dict"][
        "head.out.weight"
    ].to_sparse()
    source = synthetic.write_checkpoint(tmp_path / "sparse.ckpt", checkpoint)
    assert convert(source, tmp_path / "out", 0, trusted=False) == 1
    assert (
        "ERROR",
        f"{source}: 'head.out.weight' is a torch.sparse_coo tensor; the decoder's "
        "tensors must be dense",
    ) in messages
