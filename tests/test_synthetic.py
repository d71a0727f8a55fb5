"""The generator writes checkpoints laid out like the real training checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import synthetic
from tests.conftest import SHARED

TOP_LEVEL = [
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "state_dict",
    "loops",
    "callbacks",
    "optimizer_states",
    "lr_schedulers",
    "hparams_name",
    "hyper_parameters",
]


@pytest.fixture(scope="module")
def real_listing() -> list:
    path = SHARED / "wavtokenizer" / "large-320-24k-4096.state_dict.json"
    if not path.exists():
        pytest.skip(f"{path} is not beside this checkout")
    return json.loads(path.read_text())["state_dict"]


def test_full_size_layout_is_the_real_state_dict(real_listing):
    layout = synthetic.state_dict_layout(synthetic.Dims())
    assert [[name, list(shape), "float32"] for name, shape in layout] == real_listing


def test_tiny_checkpoint_has_the_real_top_level_and_names(tiny_checkpoint, real_listing):
    assert list(tiny_checkpoint) == TOP_LEVEL
    assert list(tiny_checkpoint["state_dict"]) == [name for name, _, _ in real_listing]
    assert tiny_checkpoint["state_dict"]["backbone.embed.weight"].shape == (64, 32, 7)
    assert tiny_checkpoint["state_dict"]["head.out.weight"].shape == (82, 64)


def test_optimizer_states_cover_the_parameters(tiny_checkpoint):
    discriminators, generator = tiny_checkpoint["optimizer_states"]
    state_dict = tiny_checkpoint["state_dict"]
    assert len(generator["state"]) == sum(
        1
        for name in state_dict
        if name.startswith(("feature_extractor.", "backbone.", "head."))
        and not name.startswith((synthetic.CODEBOOK, "head.istft"))
    )
    assert len(discriminators["state"]) == sum(
        1 for name in state_dict if name.startswith(("multiperioddisc.", "multiresddisc.", "dac."))
    )
    assert (
        generator["state"][0]["exp_avg"].shape
        == state_dict["feature_extractor.encodec.encoder.model.0.conv.conv.bias"].shape
    )


def test_shared_discriminator_is_stored_once(tiny_checkpoint):
    state_dict = tiny_checkpoint["state_dict"]
    name = "discriminators.0.convs.0.0.bias"
    assert (
        state_dict[f"dacdiscriminator.discriminator.{name}"].data_ptr()
        == state_dict[f"dac.{name}"].data_ptr()
    )


def test_same_seed_same_values_other_seed_other_values():
    first = synthetic.build_checkpoint(synthetic.TINY, shrink=16, seed=1, optimizer=False)
    again = synthetic.build_checkpoint(synthetic.TINY, shrink=16, seed=1, optimizer=False)
    other = synthetic.build_checkpoint(synthetic.TINY, shrink=16, seed=2, optimizer=False)
    name = "backbone.convnext.0.pwconv1.weight"
    assert torch.equal(first["state_dict"][name], again["state_dict"][name])
    assert not torch.equal(first["state_dict"][name], other["state_dict"][name])


def test_plain_norm_variant():
    names = [name for name, _ in synthetic.decoder_entries(synthetic.tiny_dims(adanorm=0))]
    assert "backbone.norm.weight" in names and "backbone.norm.scale.weight" not in names
    assert "backbone.convnext.0.norm.bias" in names


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C inside torch's zip writer comes out as KeyboardInterrupt, and no file stays."""

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_tiny(tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []
