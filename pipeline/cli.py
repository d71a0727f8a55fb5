"""Command line: convert one checkpoint without a config, or write a synthetic one.

    python -m pipeline convert CKPT [--output DIR] [--bandwidth-id N] [--trusted]
    convert-pt-to-hf CKPT [--output DIR] [--bandwidth-id N] [--trusted]
    python -m pipeline sample PATH [--release NAME | --tiny] [--seed N] [--no-optimizer]

`convert` runs the same six stages as doit, with its intermediates in a temporary
folder, and writes into the checkpoint's own folder unless told otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from loguru import logger

from pipeline import logs
from pipeline.configs import Entry, task_name
from pipeline.stages import STAGES, Job, run_stage
from pipeline.synthetic import RELEASES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _convert_arguments(commands.add_parser("convert", help="convert one checkpoint"))
    sample = commands.add_parser("sample", help="write a synthetic WavTokenizer checkpoint")
    sample.add_argument("path", type=Path)
    size = sample.add_mutually_exclusive_group()
    size.add_argument(
        "--release",
        choices=sorted(RELEASES),
        default="large-320-24k-4096",
        help="full-size layout of this release (default: %(default)s)",
    )
    size.add_argument("--tiny", action="store_true", help="every width divided by 16")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--no-optimizer", action="store_true", help="leave out optimizer states")
    args = parser.parse_args(argv)
    logs.configure(None)
    if args.command == "convert":
        return convert(args.checkpoint, args.output, args.bandwidth_id, args.trusted)
    return write_sample(args)


def convert_main(argv: list[str] | None = None) -> int:
    """Entry point of the convert-pt-to-hf console script."""
    parser = argparse.ArgumentParser(
        prog="convert-pt-to-hf", description="Convert one WavTokenizer checkpoint for llama.cpp."
    )
    _convert_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure(None)
    return convert(args.checkpoint, args.output, args.bandwidth_id, args.trusted)


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="the .ckpt file")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output folder (default: the checkpoint's own folder)",
    )
    parser.add_argument(
        "--bandwidth-id",
        type=int,
        default=0,
        help="row of the adaptive norms to keep (default: 0)",
    )
    parser.add_argument(
        "--trusted", action="store_true", help="allow a full pickle load (runs code in the file!)"
    )


def convert(checkpoint: Path, output: Path | None, bandwidth_id: int, trusted: bool) -> int:
    source = checkpoint.absolute()
    folder = (output or source.parent).absolute()
    entry = Entry(task_name(source), source, folder, bandwidth_id, trusted)
    with tempfile.TemporaryDirectory(prefix="convert-pt-to-hf-") as build:
        job = Job.of(entry, Path(build))
        for stage in STAGES:
            if run_stage(stage, job) is not None:
                logger.error(f"{source.name}: conversion stopped at {stage}")
                return 1
    logger.info(f"{source.name}: converted into {folder}")
    return 0


def write_sample(args: argparse.Namespace) -> int:
    from pipeline import synthetic

    if args.tiny:
        synthetic.write_tiny(args.path, seed=args.seed, optimizer=not args.no_optimizer)
    else:
        synthetic.write_release(
            args.path, args.release, seed=args.seed, optimizer=not args.no_optimizer
        )
    logger.info(f"wrote {args.path} ({args.path.stat().st_size / (1 << 20):.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
