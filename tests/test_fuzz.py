"""Damaged checkpoints end in a conversion or a clear error, never a hang or a traceback."""

from __future__ import annotations

import random
import time

import pytest
from loguru import logger

from pipeline import synthetic
from pipeline.cli import convert
from pipeline.rules import canonical_name, drop_reason

CASES = 300
SECONDS_PER_CASE = 10


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> bytes:
    """A decoder-only state dict with two ConvNeXt blocks: small enough to mutate often."""
    checkpoint = synthetic.build_checkpoint(
        synthetic.tiny_dims(num_layers=2), shrink=16, optimizer=False
    )
    checkpoint["state_dict"] = {
        name: tensor
        for name, tensor in checkpoint["state_dict"].items()
        if drop_reason(canonical_name(name)) is None
    }
    path = synthetic.write_checkpoint(tmp_path_factory.mktemp("fuzz") / "small.ckpt", checkpoint)
    return path.read_bytes()


def mutations(data: bytes, seed: int = 1234):
    """(description, mutated bytes): truncations, flipped bytes and garbage spans."""
    rng = random.Random(seed)
    size = len(data)
    central = data.rfind(b"PK\x01\x02", 0, size)
    for _ in range(CASES // 3):
        cut = rng.randrange(0, size)
        yield f"truncated at {cut}", data[:cut]
    for _ in range(CASES // 3):
        at = rng.randrange(0, size)
        yield (
            f"byte {at} flipped",
            data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :],
        )
    for index in range(CASES - 2 * (CASES // 3)):
        start = rng.randrange(central if index % 3 == 0 else 0, size)
        length = rng.randrange(1, 64)
        garbage = bytes(rng.randrange(256) for _ in range(length))
        yield f"{length} garbage bytes at {start}", data[:start] + garbage + data[start + length :]


def test_every_mutation_converts_or_fails_clearly(tmp_path, small_checkpoint):
    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(message.record["message"]), level="ERROR")
    outcomes = {"converted": 0, "refused": 0}
    try:
        for description, data in mutations(small_checkpoint):
            path = tmp_path / "case.ckpt"
            path.write_bytes(data)
            errors.clear()
            started = time.monotonic()
            status = convert(path, tmp_path / "out", 0, trusted=False)
            elapsed = time.monotonic() - started
            assert elapsed < SECONDS_PER_CASE, f"{description}: took {elapsed:.1f} s"
            if status == 0:
                outcomes["converted"] += 1
                continue
            outcomes["refused"] += 1
            assert errors, f"{description}: failed without saying why"
            first = errors[0]
            assert str(path) in first or path.name in first, f"{description}: {first}"
            assert "\n" not in first and "Traceback" not in first, f"{description}: {first}"
    finally:
        logger.remove(sink)
    assert outcomes["converted"] > 0 and outcomes["refused"] > 0, outcomes
