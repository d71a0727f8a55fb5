"""The conversion contract, on names and shapes alone."""

from __future__ import annotations

import pytest

from pipeline import rules, synthetic
from pipeline.errors import ConversionError


def kept_shapes(dims: synthetic.Dims = synthetic.TINY) -> dict[str, list[int]]:
    """The decoder's tensors of a synthetic state dict, as the flatten stage names them."""
    return {
        name: list(shape)
        for name, shape in synthetic.state_dict_layout(dims, 16)
        if rules.drop_reason(name) is None
    }


@pytest.mark.parametrize(
    "key, name",
    [
        ("backbone.embed.weight", "backbone.embed.weight"),
        ("module.backbone.embed.weight", "backbone.embed.weight"),
        ("model.module.head.out.bias", "head.out.bias"),
        ("_orig_mod.backbone.norm.scale.weight", "backbone.norm.scale.weight"),
        ("backbone.model.x", "backbone.model.x"),
    ],
)
def test_canonical_name_strips_only_leading_wrapper_prefixes(key, name):
    assert rules.canonical_name(key) == name


@pytest.mark.parametrize(
    "name, reason",
    [
        (f"{rules.CODEBOOK}.inited", "codebook training statistics (llama.cpp skips them)"),
        (f"{rules.CODEBOOK}.cluster_size", "codebook training statistics (llama.cpp skips them)"),
        (f"{rules.CODEBOOK}.embed_avg", "codebook training statistics (llama.cpp skips them)"),
        (
            "feature_extractor.encodec.encoder.model.0.conv.conv.bias",
            "audio encoder (not used to decode)",
        ),
        ("head.istft.window", "fixed STFT window (llama.cpp builds its own)"),
        ("dac.discriminators.0.convs.0.0.bias", "discriminator (training only)"),
        ("melspec_loss.mel_spec.mel_scale.fb", "loss buffer (training only)"),
        ("ema.backbone.embed.weight", "not part of the decoder (module 'ema')"),
        (rules.CODEBOOK_EMBED, None),
        ("backbone.anything", None),
        ("head.out.weight", None),
    ],
)
def test_drop_reason(name, reason):
    assert rules.drop_reason(name) == reason


@pytest.mark.parametrize(
    "name, out",
    [
        (rules.CODEBOOK_EMBED, "backbone.embedding.weight"),
        ("backbone.pos_net.0.norm1.weight", "backbone.posnet.0.norm1.weight"),
        ("backbone.pos_net.2.proj_out.bias", "backbone.posnet.2.proj_out.bias"),
        ("backbone.pos_net.5.weight", "backbone.posnet.5.norm.weight"),
        ("backbone.pos_net.5.bias", "backbone.posnet.5.norm.bias"),
        ("backbone.norm.scale.weight", "backbone.norm.weight"),
        ("backbone.norm.shift.weight", "backbone.norm.bias"),
        ("backbone.norm.weight", "backbone.norm.weight"),
        ("backbone.convnext.11.norm.shift.weight", "backbone.convnext.11.norm.bias"),
        ("backbone.convnext.3.gamma", "backbone.convnext.3.gamma.weight"),
        ("backbone.convnext.3.dwconv.bias", "backbone.convnext.3.dwconv.bias"),
        ("head.out.weight", "head.out.weight"),
    ],
)
def test_rename(name, out):
    assert rules.match_rule(name)[1] == out


@pytest.mark.parametrize(
    "name",
    [
        "backbone.convnext.3.gamma_extra",  # gamma, but not a whole segment
        "backbone.convnext.3.dwconv.gamma",  # gamma, but not where a ConvNeXt block has it
        "backbone.pos_net_extra.0.norm1.weight",
        "backbone.extra.pos_net.0.norm1.weight",
        "backbone.pos_net.0.weight.extra",
        "backbone.norm.scale.weight.extra",
        "head.out.weight_g",
    ],
)
def test_names_that_only_contain_a_rule_word_are_not_rewritten(name):
    assert rules.match_rule(name) is None


def test_plan_of_the_large_release_matches_llama_cpp_reference(reference):
    shapes = kept_shapes(synthetic.Dims())
    dims, planned = rules.plan(shapes, dict.fromkeys(shapes, "float32"), 0)
    assert sorted([p.name, p.shape, "F32"] for p in planned) == sorted(
        reference["model.safetensors"]
    )
    assert dims.hf_config() == reference["config.json"]


def test_plan_selects_rows_and_columns():
    shapes = kept_shapes()
    _, planned = rules.plan(shapes, dict.fromkeys(shapes, "float32"), 3)
    by_name = {p.name: p for p in planned}
    assert by_name["backbone.norm.weight"] == rules.Planned(
        "backbone.norm.weight", "backbone.norm.scale.weight", [64], "float32", 3
    )
    assert by_name["backbone.convnext.0.norm.bias"].row == 3
    assert by_name["backbone.embed.bias"].shape == [64, 1]
    assert by_name["backbone.posnet.5.norm.weight"].shape == [64, 1]
    assert by_name["backbone.posnet.2.q.bias"].shape == [64, 1]
    assert by_name["backbone.posnet.2.q.weight"].shape == [64, 64, 1]
    assert by_name["backbone.convnext.0.dwconv.bias"].shape == [64, 1]
    assert by_name["backbone.convnext.0.gamma.weight"].shape == [64]
    assert by_name["backbone.final_layer_norm.weight"].shape == [64]
    assert by_name["head.out.bias"].shape == [82]
    assert [p.name for p in planned] == sorted(p.name for p in planned)


def test_plain_layernorms_are_kept_as_they_are():
    shapes = kept_shapes(synthetic.tiny_dims(adanorm=0))
    dims, planned = rules.plan(shapes, dict.fromkeys(shapes, "float16"), 0)
    by_name = {p.name: p for p in planned}
    assert dims.norm_rows == 0
    assert by_name["backbone.norm.weight"] == rules.Planned(
        "backbone.norm.weight", "backbone.norm.weight", [64], "float16", None
    )
    assert by_name["backbone.convnext.4.norm.bias"].source == "backbone.convnext.4.norm.bias"


def test_bandwidth_out_of_range_is_an_error():
    shapes = kept_shapes()
    with pytest.raises(
        ConversionError, match=r"bandwidth_id 4 is out of range: .* 4 rows \(0 to 3\)"
    ):
        rules.plan(shapes, dict.fromkeys(shapes, "float32"), 4)


def test_unknown_tensor_in_scope_is_named():
    shapes = {**kept_shapes(), "backbone.convnext.0.extra.weight": [64]}
    with pytest.raises(
        ConversionError, match=r"match no conversion rule: 'backbone.convnext.0.extra.weight'"
    ):
        rules.audit(shapes)


def test_missing_head_is_named():
    shapes = kept_shapes()
    del shapes["head.out.weight"]
    with pytest.raises(ConversionError, match=r"required tensor\(s\) missing: 'head.out.weight'"):
        rules.audit(shapes)


def test_missing_part_of_a_block_is_named():
    shapes = kept_shapes()
    del shapes["backbone.convnext.7.pwconv2.bias"], shapes["backbone.pos_net.2.k.weight"]
    with pytest.raises(ConversionError) as error:
        rules.audit(shapes)
    assert str(error.value) == (
        "required tensor(s) missing: 'backbone.convnext.7.pwconv2.bias', "
        "'backbone.pos_net.2.k.weight'"
    )


def test_convnext_block_of_another_width_is_named():
    shapes = kept_shapes()
    shapes["backbone.convnext.5.pwconv1.weight"] = [256, 64]
    with pytest.raises(ConversionError) as error:
        rules.audit(shapes)
    assert str(error.value) == (
        "tensor shape(s) disagree with the rest of the decoder: "
        "backbone.convnext.5.pwconv1.weight is [256, 64], expected [192, 64]"
    )


def test_posnet_in_another_layout_is_an_error():
    shapes = kept_shapes()
    for part in ("weight", "bias"):
        shapes[f"backbone.pos_net.6.{part}"] = shapes.pop(f"backbone.pos_net.5.{part}")
    with pytest.raises(ConversionError, match="more blocks than llama.cpp runs"):
        rules.audit(shapes)


def test_non_float_tensor_is_an_error():
    shapes = kept_shapes()
    dtypes = dict.fromkeys(shapes, "float32") | {"head.out.bias": "int64"}
    with pytest.raises(ConversionError, match=r"head.out.bias \(int64\)"):
        rules.plan(shapes, dtypes, 0)


def test_the_odd_tensor_is_blamed_not_the_ones_that_agree():
    shapes = kept_shapes()
    shapes["backbone.embed.weight"] = [10, 3, 7]
    with pytest.raises(ConversionError) as error:
        rules.audit(shapes)
    assert str(error.value) == (
        "tensor shape(s) disagree with the rest of the decoder: "
        "backbone.embed.weight is [10, 3, 7], expected [64, 32, k]"
    )
