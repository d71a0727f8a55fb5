"""The conversion contract: which tensors the decoder keeps, and how each is renamed.

Everything here works on names and shapes only, so it is cheap and needs no torch.
A name is "canonical" once the distributed-training prefixes (`module.`, `model.`) are
removed; the rules below match canonical names as whole dot-separated segments.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from pipeline.errors import ConversionError

CODEBOOK = "feature_extractor.encodec.quantizer.vq.layers.0._codebook"
CODEBOOK_EMBED = f"{CODEBOOK}.embed"
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")

# llama.cpp runs the posnet as two residual blocks, attention, two residual blocks, norm.
POSNET_LAYOUT = ("resnet", "resnet", "attention", "resnet", "resnet", "norm")

FLOAT_DTYPES = ("float32", "float16", "bfloat16")

# Constants of the WavTokenizer decoder that llama.cpp reads from config.json.
HF_CONSTANTS = {
    "n_head": 1,
    "layer_norm_epsilon": 1e-6,
    "group_norm_epsilon": 1e-6,
    "group_norm_groups": 32,
    "max_position_embeddings": 8192,
}

# Tensors of the training module that the decoder does not use, with the reason.
# The first pattern that matches a canonical name wins.
DROPPED: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), reason)
    for pattern, reason in (
        (
            rf"{re.escape(CODEBOOK)}\.(inited|cluster_size|embed_avg)",
            "codebook training statistics (llama.cpp skips them)",
        ),
        (r"feature_extractor\.encodec\.encoder\..+", "audio encoder (not used to decode)"),
        (
            r"feature_extractor\.encodec\.decoder\..+",
            "EnCodec's own decoder (the backbone decodes instead)",
        ),
        (r"head\.istft\.window", "fixed STFT window (llama.cpp builds its own)"),
        (
            r"(multiperioddisc|multiresddisc|dac|dacdiscriminator)\..+",
            "discriminator (training only)",
        ),
        (r"melspec_loss\..+", "loss buffer (training only)"),
    )
)

# Canonical names in the decoder's scope: every one must match a rule below.
DECODER_SCOPE = re.compile(r"(backbone|head|feature_extractor\.encodec\.quantizer)\..+")


@dataclass(frozen=True)
class Rule:
    """How one kind of decoder tensor is named and shaped in the output.

    `shape` names each axis with a size symbol (see `Dims.symbols`) or fixes it; None
    leaves an axis (a kernel size) free. `row` takes one row of a per-bandwidth table;
    `column` turns a vector [C] into [C, 1] so that llama.cpp can broadcast it in time.
    """

    pattern: re.Pattern[str]
    rename: str
    shape: tuple[str | int | None, ...]
    row: bool = False
    column: bool = False


def _rule(pattern: str, rename: str, shape: tuple, **flags: bool) -> Rule:
    return Rule(re.compile(pattern), rename, shape, **flags)


N = r"(?P<n>\d+)"
POSNET = r"backbone\.pos_net\." + N
RULES: tuple[Rule, ...] = (
    _rule(re.escape(CODEBOOK_EMBED), "backbone.embedding.weight", ("vocab", "features")),
    _rule(r"backbone\.embed\.weight", "backbone.embed.weight", ("C", "features", None)),
    _rule(r"backbone\.embed\.bias", "backbone.embed.bias", ("C",), column=True),
    _rule(r"backbone\.norm\.scale\.weight", "backbone.norm.weight", ("R", "C"), row=True),
    _rule(r"backbone\.norm\.shift\.weight", "backbone.norm.bias", ("R", "C"), row=True),
    _rule(r"backbone\.norm\.(?P<p>weight|bias)", "backbone.norm.{p}", ("C",)),
    _rule(
        r"backbone\.convnext\." + N + r"\.dwconv\.weight",
        "backbone.convnext.{n}.dwconv.weight",
        ("C", 1, None),
    ),
    _rule(
        r"backbone\.convnext\." + N + r"\.dwconv\.bias",
        "backbone.convnext.{n}.dwconv.bias",
        ("C",),
        column=True,
    ),
    _rule(
        r"backbone\.convnext\." + N + r"\.norm\.scale\.weight",
        "backbone.convnext.{n}.norm.weight",
        ("R", "C"),
        row=True,
    ),
    _rule(
        r"backbone\.convnext\." + N + r"\.norm\.shift\.weight",
        "backbone.convnext.{n}.norm.bias",
        ("R", "C"),
        row=True,
    ),
    _rule(
        r"backbone\.convnext\." + N + r"\.norm\.(?P<p>weight|bias)",
        "backbone.convnext.{n}.norm.{p}",
        ("C",),
    ),
    _rule(
        r"backbone\.convnext\." + N + r"\.pwconv1\.weight",
        "backbone.convnext.{n}.pwconv1.weight",
        ("FF", "C"),
    ),
    _rule(
        r"backbone\.convnext\." + N + r"\.pwconv1\.bias",
        "backbone.convnext.{n}.pwconv1.bias",
        ("FF",),
    ),
    _rule(
        r"backbone\.convnext\." + N + r"\.pwconv2\.weight",
        "backbone.convnext.{n}.pwconv2.weight",
        ("C", "FF"),
    ),
    _rule(
        r"backbone\.convnext\." + N + r"\.pwconv2\.bias",
        "backbone.convnext.{n}.pwconv2.bias",
        ("C",),
    ),
    _rule(r"backbone\.convnext\." + N + r"\.gamma", "backbone.convnext.{n}.gamma.weight", ("C",)),
    _rule(
        r"backbone\.final_layer_norm\.(?P<p>weight|bias)", "backbone.final_layer_norm.{p}", ("C",)
    ),
    _rule(
        POSNET + r"\.(?P<m>norm1|norm2|norm)\.(?P<p>weight|bias)",
        "backbone.posnet.{n}.{m}.{p}",
        ("C",),
        column=True,
    ),
    _rule(
        POSNET + r"\.(?P<m>conv1|conv2)\.weight",
        "backbone.posnet.{n}.{m}.weight",
        ("C", "C", None),
    ),
    _rule(
        POSNET + r"\.(?P<m>q|k|v|proj_out)\.weight",
        "backbone.posnet.{n}.{m}.weight",
        ("C", "C", 1),
    ),
    _rule(
        POSNET + r"\.(?P<m>conv1|conv2|q|k|v|proj_out)\.bias",
        "backbone.posnet.{n}.{m}.bias",
        ("C",),
        column=True,
    ),
    _rule(POSNET + r"\.(?P<p>weight|bias)", "backbone.posnet.{n}.norm.{p}", ("C",), column=True),
    _rule(r"head\.out\.weight", "head.out.weight", ("H", "C")),
    _rule(r"head\.out\.bias", "head.out.bias", ("H",)),
)

POSNET_BLOCKS = {
    "resnet": {
        f"{m}.{p}" for m in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias")
    },
    "attention": {
        f"{m}.{p}" for m in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")
    },
    "norm": {"weight", "bias"},
}
CONVNEXT_BLOCK = {
    "gamma",
    "dwconv.weight",
    "dwconv.bias",
    "pwconv1.weight",
    "pwconv1.bias",
    "pwconv2.weight",
    "pwconv2.bias",
}
ADAPTIVE_NORM = {"norm.scale.weight", "norm.shift.weight"}
PLAIN_NORM = {"norm.weight", "norm.bias"}
REQUIRED = (
    CODEBOOK_EMBED,
    "backbone.embed.weight",
    "backbone.embed.bias",
    "backbone.final_layer_norm.weight",
    "backbone.final_layer_norm.bias",
    "head.out.weight",
    "head.out.bias",
)


def canonical_name(key: str) -> str:
    """The state dict key without the prefixes that DDP, wrappers or torch.compile add."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def drop_reason(name: str) -> str | None:
    """Why a canonical name is left out of the output, or None when the decoder keeps it."""
    for pattern, reason in DROPPED:
        if pattern.fullmatch(name):
            return reason
    if DECODER_SCOPE.fullmatch(name):
        return None
    return f"not part of the decoder (module '{name.split('.')[0]}')"


def looks_like_decoder(key: str) -> bool:
    """True for keys that only a WavTokenizer state dict holds; used to find it."""
    name = canonical_name(key)
    return name.startswith("backbone.") or name.startswith("head.out.") or name == CODEBOOK_EMBED


def match_rule(name: str) -> tuple[Rule, str] | None:
    """The rule for a canonical name and the output name it gives, or None if unknown."""
    for rule in RULES:
        found = rule.pattern.fullmatch(name)
        if found:
            return rule, rule.rename.format(**found.groupdict())
    return None


@dataclass(frozen=True)
class Dims:
    """Sizes of the decoder, all read from tensor shapes."""

    channels: int
    features: int
    vocab: int
    n_ff: int
    head: int
    convnext_layers: int
    posnet_layers: int
    norm_rows: int  # rows of the adaptive norm tables; 0 when the norms are plain

    def symbols(self) -> dict[str, int]:
        return {
            "C": self.channels,
            "features": self.features,
            "vocab": self.vocab,
            "FF": self.n_ff,
            "H": self.head,
            "R": self.norm_rows,
        }

    def hf_config(self) -> dict:
        """config.json for llama.cpp, keys in the order llama.cpp's own example uses."""
        return {
            "architectures": ["WavTokenizerDec"],
            "hidden_size": self.head,
            "n_embd_features": self.features,
            "n_ff": self.n_ff,
            "vocab_size": self.vocab,
            **HF_CONSTANTS,
            "n_layer": self.convnext_layers,
            "posnet": {"n_embd": self.channels, "n_layer": self.posnet_layers},
            "convnext": {"n_embd": self.channels, "n_layer": self.convnext_layers},
        }


def audit(shapes: dict[str, list[int]]) -> Dims:
    """Check the kept tensors against the decoder's architecture and read its sizes.

    Raises ConversionError naming every unknown tensor, every missing one and every
    shape that disagrees with the others.
    """
    unknown = sorted(name for name in shapes if match_rule(name) is None)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} tensor(s) in the decoder's scope match no conversion rule: "
            f"{_sample(unknown)}; the checkpoint is not a WavTokenizer decoder this "
            "converter knows"
        )
    missing = _missing(shapes)
    if missing:
        raise ConversionError(f"required tensor(s) missing: {_sample(missing)}")
    dims = _read_dims(shapes)
    wrong = []
    for name, shape in sorted(shapes.items()):
        rule, _ = match_rule(name)
        expected = [
            dims.symbols().get(axis, axis) if isinstance(axis, str) else axis
            for axis in rule.shape
        ]
        if len(shape) != len(expected) or any(
            want is not None and want != got for want, got in zip(expected, shape)
        ):
            wrong.append(f"{name} is {list(shape)}, expected {_describe(expected)}")
    if wrong:
        raise ConversionError(
            "tensor shape(s) disagree with the rest of the decoder: "
            + "; ".join(wrong[:5])
            + (" ..." if len(wrong) > 5 else "")
        )
    return dims


def _missing(shapes: dict[str, list[int]]) -> list[str]:
    missing = [name for name in REQUIRED if name not in shapes]
    missing += _missing_norm("backbone", shapes)
    blocks = _block_indices("backbone.convnext.", shapes)
    for n in range(max(blocks, default=-1) + 1):
        block = f"backbone.convnext.{n}"
        missing += [
            f"{block}.{part}" for part in sorted(CONVNEXT_BLOCK) if f"{block}.{part}" not in shapes
        ]
        missing += _missing_norm(block, shapes)
    if not blocks:
        missing.append("backbone.convnext.0.*")
    missing += _missing_posnet(shapes)
    return missing


def _missing_norm(prefix: str, shapes: dict[str, list[int]]) -> list[str]:
    present = {part for part in ADAPTIVE_NORM | PLAIN_NORM if f"{prefix}.{part}" in shapes}
    if present in (ADAPTIVE_NORM, PLAIN_NORM):
        return []
    expected = ADAPTIVE_NORM if present & ADAPTIVE_NORM else PLAIN_NORM
    return [f"{prefix}.{part}" for part in sorted(expected - present)]


def _missing_posnet(shapes: dict[str, list[int]]) -> list[str]:
    missing = []
    for n, kind in enumerate(POSNET_LAYOUT):
        block = f"backbone.pos_net.{n}"
        missing += [
            f"{block}.{part}"
            for part in sorted(POSNET_BLOCKS[kind])
            if f"{block}.{part}" not in shapes
        ]
    extra = sorted(
        name
        for name in shapes
        if name.startswith("backbone.pos_net.") and int(name.split(".")[2]) >= len(POSNET_LAYOUT)
    )
    if extra:
        raise ConversionError(
            f"the posnet has more blocks than llama.cpp runs ({len(POSNET_LAYOUT)}): "
            f"{_sample(extra)}"
        )
    misplaced = [
        name
        for name in shapes
        if name.startswith("backbone.pos_net.")
        and name.split(".", 3)[3] not in POSNET_BLOCKS[POSNET_LAYOUT[int(name.split(".")[2])]]
    ]
    if misplaced:
        raise ConversionError(
            "the posnet's blocks are not laid out as llama.cpp runs them "
            f"({', '.join(POSNET_LAYOUT)}): {_sample(sorted(misplaced))}"
        )
    return missing


def _block_indices(prefix: str, shapes: dict[str, list[int]]) -> set[int]:
    return {int(name[len(prefix) :].split(".")[0]) for name in shapes if name.startswith(prefix)}


def _read_dims(shapes: dict[str, list[int]]) -> Dims:
    """The decoder's sizes, each the value most tensors agree on.

    Voting, rather than reading one tensor, lets the audit blame the odd tensor out
    instead of every tensor that disagrees with it.
    """
    votes: dict[str, Counter] = defaultdict(Counter)
    # The codebook votes first, so that it wins a tie on its own sizes.
    for name, shape in sorted(shapes.items(), key=lambda item: (item[0] != CODEBOOK_EMBED, item)):
        rule, _ = match_rule(name)
        for axis, size in zip(rule.shape, shape):
            if isinstance(axis, str):
                votes[axis][size] += 1
    size = {axis: counter.most_common(1)[0][0] for axis, counter in votes.items()}
    return Dims(
        channels=size["C"],
        features=size["features"],
        vocab=size["vocab"],
        n_ff=size["FF"],
        head=size["H"],
        convnext_layers=len(_block_indices("backbone.convnext.", shapes)),
        posnet_layers=len(_block_indices("backbone.pos_net.", shapes)),
        norm_rows=size.get("R", 0),
    )


def _describe(sizes: list) -> str:
    """A shape for messages; `k` stands for a free kernel size."""
    return "[" + ", ".join(str(size) if size is not None else "k" for size in sizes) + "]"


def _sample(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class Planned:
    """One output tensor: where it comes from and what is done to it."""

    name: str
    source: str
    shape: list[int]
    dtype: str
    row: int | None


def plan(
    shapes: dict[str, list[int]], dtypes: dict[str, str], bandwidth_id: int
) -> tuple[Dims, list[Planned]]:
    """The output tensors, sorted by name, for the given bandwidth row."""
    dims = audit(shapes)
    if dims.norm_rows and not 0 <= bandwidth_id < dims.norm_rows:
        raise ConversionError(
            f"bandwidth_id {bandwidth_id} is out of range: the adaptive norms have "
            f"{dims.norm_rows} rows (0 to {dims.norm_rows - 1})"
        )
    odd = sorted(name for name, dtype in dtypes.items() if dtype not in FLOAT_DTYPES)
    if odd:
        raise ConversionError(
            "tensor(s) of a type the decoder cannot use: "
            + ", ".join(f"{name} ({dtypes[name]})" for name in odd[:5])
        )
    planned = []
    for name, shape in shapes.items():
        rule, out = match_rule(name)
        shape = list(shape)
        if rule.row:
            shape = shape[1:]
        if rule.column:
            shape = shape + [1]
        planned.append(Planned(out, name, shape, dtypes[name], bandwidth_id if rule.row else None))
    return dims, sorted(planned, key=lambda item: item.name)
