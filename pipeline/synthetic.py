"""Synthetic WavTokenizer training checkpoints, laid out like the real ones.

The real large 75-token release is a PyTorch Lightning 1.8 checkpoint: a dict of ten
top-level keys whose `state_dict` holds the encoder, the quantizer, the decoder, the
discriminators and the loss buffers, followed by two AdamW states. The generator
rebuilds that layout with random values from a seed, so that tests, the demo and the
benchmark never need the real weights.

The decoder's sizes come from `Dims`; every other entry is read from
`data/training_layout.json`, the names and shapes of the real release, and shrunk
for the scaled-down checkpoints that tests use.
"""

from __future__ import annotations

import json
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

CODEBOOK = "feature_extractor.encodec.quantizer.vq.layers.0._codebook"
SHARED_DISCRIMINATOR = ("dac.", "dacdiscriminator.discriminator.")


@dataclass(frozen=True)
class Dims:
    """The sizes that tell one WavTokenizer decoder from another."""

    input_channels: int = 512
    dim: int = 768
    intermediate: int = 2304
    num_layers: int = 12
    adanorm: int = 4
    vocab: int = 4096
    n_fft: int = 1280
    hop: int = 320


RELEASES: dict[str, Dims] = {
    "small-600-24k-4096": Dims(n_fft=2400, hop=600),
    "small-320-24k-4096": Dims(),
    "medium-320-24k-4096": Dims(),
    "large-600-24k-4096": Dims(n_fft=2400, hop=600),
    "large-320-24k-4096": Dims(),
}

# Every width divided by 16 (GroupNorm's 32 groups still divide `dim`).
TINY = Dims(input_channels=32, dim=64, intermediate=192, vocab=256, n_fft=80, hop=20)
TINY_SHRINK = 16


def decoder_entries(dims: Dims) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the backbone and head, in the training module's order."""
    c, i = dims.dim, dims.intermediate
    entries = [
        ("backbone.embed.weight", (c, dims.input_channels, 7)),
        ("backbone.embed.bias", (c,)),
    ]
    entries += _norm("backbone.norm", c, dims.adanorm)
    for n in range(dims.num_layers):
        block = f"backbone.convnext.{n}"
        entries += [(f"{block}.gamma", (c,))]
        entries += [(f"{block}.dwconv.weight", (c, 1, 7)), (f"{block}.dwconv.bias", (c,))]
        entries += _norm(f"{block}.norm", c, dims.adanorm)
        entries += [(f"{block}.pwconv1.weight", (i, c)), (f"{block}.pwconv1.bias", (i,))]
        entries += [(f"{block}.pwconv2.weight", (c, i)), (f"{block}.pwconv2.bias", (c,))]
    entries += [
        ("backbone.final_layer_norm.weight", (c,)),
        ("backbone.final_layer_norm.bias", (c,)),
    ]
    for n in (0, 1, 3, 4):
        entries += _resnet_block(f"backbone.pos_net.{n}", c)
        if n == 1:
            entries += _attention_block("backbone.pos_net.2", c)
    entries += [("backbone.pos_net.5.weight", (c,)), ("backbone.pos_net.5.bias", (c,))]
    head = dims.n_fft + 2
    entries += [("head.out.weight", (head, c)), ("head.out.bias", (head,))]
    entries += [("head.istft.window", (dims.n_fft,))]
    return entries


def _norm(prefix: str, c: int, adanorm: int) -> list[tuple[str, tuple[int, ...]]]:
    if adanorm:
        return [(f"{prefix}.scale.weight", (adanorm, c)), (f"{prefix}.shift.weight", (adanorm, c))]
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,))]


def _resnet_block(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for n in (1, 2):
        entries += [(f"{prefix}.norm{n}.weight", (c,)), (f"{prefix}.norm{n}.bias", (c,))]
        entries += [(f"{prefix}.conv{n}.weight", (c, c, 3)), (f"{prefix}.conv{n}.bias", (c,))]
    return entries


def _attention_block(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    entries = [(f"{prefix}.norm.weight", (c,)), (f"{prefix}.norm.bias", (c,))]
    for conv in ("q", "k", "v", "proj_out"):
        entries += [(f"{prefix}.{conv}.weight", (c, c, 1)), (f"{prefix}.{conv}.bias", (c,))]
    return entries


def codebook_entries(dims: Dims) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{CODEBOOK}.inited", (1,)),
        (f"{CODEBOOK}.cluster_size", (dims.vocab,)),
        (f"{CODEBOOK}.embed", (dims.vocab, dims.input_channels)),
        (f"{CODEBOOK}.embed_avg", (dims.vocab, dims.input_channels)),
    ]


def state_dict_layout(dims: Dims, shrink: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Every state dict entry of the training module, in order, as (name, shape)."""
    layout = _training_layout()
    other = {
        part: [(name, _shrunk(shape, shrink)) for name, shape in layout[part]]
        for part in ("encoder", "decoder", "training")
    }
    losses = [entry for entry in other["training"] if entry[0].startswith("melspec_loss.")]
    discriminators = [entry for entry in other["training"] if entry not in losses]
    old, new = SHARED_DISCRIMINATOR
    shared = [
        (new + name[len(old) :], shape) for name, shape in discriminators if name.startswith(old)
    ]
    return (
        other["encoder"]
        + codebook_entries(dims)
        + other["decoder"]
        + decoder_entries(dims)
        + discriminators
        + shared
        + losses
    )


def _training_layout() -> dict[str, Any]:
    text = resources.files("pipeline").joinpath("data/training_layout.json").read_text()
    return json.loads(text)


def _shrunk(shape: list[int], shrink: int) -> tuple[int, ...]:
    return tuple(max(size // shrink, 2) if size >= 64 else size for size in shape)


def _is_buffer(name: str) -> bool:
    return name.startswith((CODEBOOK, "head.istft.", "melspec_loss."))


def build_checkpoint(
    dims: Dims = Dims(),
    *,
    shrink: int = 1,
    seed: int = 0,
    dtype: "torch.dtype | None" = None,
    optimizer: bool = True,
) -> dict[str, Any]:
    """The training checkpoint as Lightning's `trainer.save_checkpoint` would save it."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    state_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
    old, new = SHARED_DISCRIMINATOR
    for name, shape in state_dict_layout(dims, shrink):
        if name.startswith(new):
            state_dict[name] = state_dict[old + name[len(new) :]]
        else:
            state_dict[name] = _random(shape, generator, dtype)
    generator_params = [
        n
        for n in state_dict
        if n.startswith(("feature_extractor.", "backbone.", "head.")) and not _is_buffer(n)
    ]
    discriminator_params = [
        n for n in state_dict if n.startswith(("multiperioddisc.", "multiresddisc.", old))
    ]
    optimizer_states = []
    if optimizer:
        optimizer_states = [
            _adamw_state(state_dict, discriminator_params, generator),
            _adamw_state(state_dict, generator_params, generator),
        ]
    return {
        "epoch": 14,
        "global_step": 3000,
        "pytorch-lightning_version": "1.8.6",
        "state_dict": state_dict,
        "loops": _loops(),
        "callbacks": _callbacks(),
        "optimizer_states": optimizer_states,
        "lr_schedulers": [_scheduler(), _scheduler()],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "sample_rate": 24000,
            "initial_learning_rate": 2e-4,
            "num_warmup_steps": 0,
            "mel_loss_coeff": 45.0,
            "mrd_loss_coeff": 1.0,
            "pretrain_mel_steps": 0,
            "decay_mel_coeff": False,
            "evaluate_utmos": True,
            "evaluate_pesq": True,
            "evaluate_periodicty": True,
        },
    }


def _random(
    shape: tuple[int, ...], generator: "torch.Generator", dtype: "torch.dtype"
) -> "torch.Tensor":
    import torch

    return torch.randn(shape, generator=generator).to(dtype)


def _adamw_state(
    state_dict: dict, names: list[str], generator: "torch.Generator"
) -> dict[str, Any]:
    import torch

    state = {}
    for index, name in enumerate(names):
        param = state_dict[name]
        state[index] = {
            "step": torch.tensor(3000.0),
            "exp_avg": _random(tuple(param.shape), generator, param.dtype),
            "exp_avg_sq": _random(tuple(param.shape), generator, param.dtype).abs(),
        }
    group = {
        "lr": 2e-4,
        "betas": (0.8, 0.9),
        "eps": 1e-8,
        "weight_decay": 0.01,
        "amsgrad": False,
        "foreach": None,
        "maximize": False,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "initial_lr": 2e-4,
        "params": list(range(len(names))),
    }
    return {"state": state, "param_groups": [group]}


def _loops() -> dict[str, Any]:
    progress = {
        "total": {"ready": 3000, "started": 3000, "processed": 3000, "completed": 3000},
        "current": {"ready": 200, "started": 200, "processed": 200, "completed": 200},
    }
    return {
        "fit_loop": {
            "state_dict": {},
            "epoch_loop.state_dict": {"_batches_that_stepped": 3000},
            "epoch_loop.batch_progress": progress,
            "epoch_loop.scheduler_progress": {
                "total": {"ready": 3000, "completed": 3000},
                "current": {"ready": 200, "completed": 200},
            },
            "epoch_progress": progress,
        },
        "validate_loop": {"state_dict": {}, "dataloader_progress": progress},
        "test_loop": {"state_dict": {}},
        "predict_loop": {"state_dict": {}},
    }


def _callbacks() -> dict[str, Any]:
    import torch

    key = (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
        "'every_n_epochs': 1, 'train_time_interval': None}"
    )
    best = "/data/runs/wavtokenizer/lightning_logs/version_0/checkpoints/epoch=14-step=3000.ckpt"
    return {
        key: {
            "monitor": "val_loss",
            "best_model_score": torch.tensor(3.25),
            "best_model_path": best,
            "current_score": torch.tensor(3.25),
            "dirpath": str(Path(best).parent),
            "best_k_models": {best: torch.tensor(3.25)},
            "kth_best_model_path": best,
            "kth_value": torch.tensor(3.25),
            "last_model_path": best.replace("epoch=14-step=3000", "last"),
        },
    }


def _scheduler() -> dict[str, Any]:
    return {
        "base_lrs": [2e-4],
        "last_epoch": 3000,
        "verbose": False,
        "_step_count": 3001,
        "_get_lr_called_within_step": False,
        "_last_lr": [1.9e-4],
        "lr_lambdas": [None],
    }


def write_checkpoint(path: Path, checkpoint: dict[str, Any], *, legacy: bool = False) -> Path:
    """Save with torch.save through a temporary file, so a reader never sees half of it."""
    import torch

    from pipeline.files import atomic_path

    path = Path(path)
    with atomic_path(path) as temp, temp.open("wb") as file:
        # Through a file object, as Lightning saves: the zip's root folder is then
        # "archive", whatever the file is called.
        try:
            torch.save(checkpoint, file, _use_new_zipfile_serialization=not legacy)
        except RuntimeError as error:
            # Ctrl-C inside torch's zip writer surfaces as its own RuntimeError.
            if isinstance(error.__context__, KeyboardInterrupt):
                raise error.__context__ from None
            raise
    return path


def write_release(
    path: Path, release: str = "large-320-24k-4096", *, seed: int = 0, optimizer: bool = True
) -> Path:
    """A full-size checkpoint shaped like a public release (about 2 GB for the large ones)."""
    return write_checkpoint(
        path, build_checkpoint(RELEASES[release], seed=seed, optimizer=optimizer)
    )


def write_tiny(path: Path, *, seed: int = 0, dims: Dims = TINY, **options: Any) -> Path:
    """A checkpoint with the real layout and every width divided by 16: a few MB."""
    legacy = options.pop("legacy", False)
    checkpoint = build_checkpoint(dims, shrink=TINY_SHRINK, seed=seed, **options)
    return write_checkpoint(path, checkpoint, legacy=legacy)


def tiny_dims(**changes: int) -> Dims:
    return replace(TINY, **changes)


@contextmanager
def foreign_module(module_name: str, **classes: type) -> Iterator[types.ModuleType]:
    """Make classes picklable under a module that does not exist once the block ends.

    Lets tests save objects of "training code" classes that the converter will not find.
    """
    parts = module_name.split(".")
    names = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    module = sys.modules[module_name]
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = module_name, name
        setattr(module, name, cls)
    try:
        yield module
    finally:
        for name in added:
            del sys.modules[name]


def write_sample(path: str, release: str, name: str) -> None:
    """doit action: write the full-size sample checkpoint that a config entry asks for."""
    from loguru import logger

    from pipeline.files import remove_stale_temps

    with logger.contextualize(checkpoint=name, stage="sample"):
        for stale in remove_stale_temps(Path(path).parent):
            logger.info(f"removed {stale.name}, left behind by an interrupted run")
        logger.info(
            f"generating a synthetic {release} checkpoint at {path} (about 2 GB, "
            "random weights, seed 0)"
        )
        write_release(Path(path), release)
        logger.info(f"wrote {path} ({Path(path).stat().st_size / (1 << 20):.0f} MiB)")
