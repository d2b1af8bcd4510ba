"""``python -m train``: train a long-tailed classifier with SGD, SAM, ImbSAM or SSE-SAM.

Flag names are the SSE-SAM seed code's (``--imb_factor --opt --head_rho ...``). Bad input gets
one line on stderr and exit status 2, before anything is written; a diverged run exits 3.

Examples::

    python -m train --dataset digits --opt ssesam --epochs 30 --out checkpoints/digits-ssesam
    python -m train --dataset cifar100 --imb_factor 100 --opt ssesam --head_rho 0.05 \\
        --tail_rho 0.1 --gamma 0.7 --eta 100 --data_dir data --out checkpoints/c100-ssesam
    python -m train --resume checkpoints/c100-ssesam
    torchrun --nproc_per_node 4 -m train --dataset cifar100 --opt ssesam \\
        --out checkpoints/c100-ssesam   # data parallel: --batch_size is the global batch
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from train.cli_base import OneLineParser, UsageError, one_line
from train.config import Config, ConfigError

__all__ = ["main", "build_parser", "UsageError"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    d = Config()  # defaults, for the help text
    p = OneLineParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                argument_default=argparse.SUPPRESS,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=["digits", "cifar10", "cifar100"], help=f"[{d.dataset}]")
    data.add_argument("--data_dir", help="folder holding the CIFAR python batches [data]")
    data.add_argument("--imb_factor", type=float, help=f"largest / smallest class [{d.imb_factor:g}]")
    data.add_argument("--selection", choices=["first", "shuffled"],
                      help="which images of a class are kept [first]")
    data.add_argument("--eta", type=float,
                      help="tail = classes with fewer than eta training images "
                           "[100 for CIFAR, 40 for digits]")
    model = p.add_argument_group("model and loss")
    model.add_argument("--model", choices=["resnet32", "resnet34", "mlp", "cnn"],
                       help="[mlp for digits, resnet32 for CIFAR]")
    model.add_argument("--width", type=int, help="MLP units / channels of the first stage")
    model.add_argument("--loss", choices=["CE", "LDAM", "VS", "LA"], help="[CE]")
    model.add_argument("--gamma_vs", type=float, help="VS loss exponent [0.05]")
    model.add_argument("--tau", type=float, help="VS / LA prior temperature [0.75]")
    opt = p.add_argument_group("optimizer")
    opt.add_argument("--opt", choices=["sgd", "sam", "imbsam", "ssesam"], help="[sgd]")
    opt.add_argument("--rho", type=float, help="SAM / ImbSAM radius [0.05]")
    opt.add_argument("--head_rho", type=float, help="SSE-SAM head radius in stage I [0.05]")
    opt.add_argument("--tail_rho", type=float, help="SSE-SAM tail radius [0.1]")
    opt.add_argument("--gamma", type=float,
                     help="SSE-SAM: head_rho applies to epochs < ceil(gamma * epochs) [0.7]")
    opt.add_argument("--group_reduction", choices=["batch", "group"],
                     help="group losses divided by the batch size or by the group's size [batch]")
    opt.add_argument("--tail_scale", type=float,
                     help="factor on the tail loss (2 = the ImbSAM authors' code) [1]")
    opt.add_argument("--bn_update", choices=["w", "all"],
                     help="BatchNorm running stats from the forward at w only, or at every "
                          "perturbed weight too (seed code) [w]")
    opt.add_argument("--epochs", type=int, help=f"[{d.epochs}]")
    opt.add_argument("--batch_size", type=int, help=f"[{d.batch_size}]")
    opt.add_argument("--lr", type=float, help=f"[{d.lr}]")
    opt.add_argument("--momentum", type=float, help=f"[{d.momentum}]")
    opt.add_argument("--wd", type=float, help=f"weight decay [{d.wd}]")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, help=f"[{d.seed}]")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N [auto]")
    run.add_argument("--out", help="run folder [checkpoints/DATASET-OPT-LOSS]")
    run.add_argument("--save_every", type=int, help=f"checkpoint every N epochs [{d.save_every}]")
    run.add_argument("--tta", type=_bool, nargs="?", const=True,
                     help="evaluate with horizontal-flip test-time augmentation [false]")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its newest good checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    fast = p.add_argument_group("speed (GPU)")
    fast.add_argument("--channels_last", type=_bool, nargs="?", const=True, help="[false]")
    fast.add_argument("--bf16", type=_bool, nargs="?", const=True,
                      help="bf16 autocast of forwards and backwards [false]")
    fast.add_argument("--compile", type=_bool, nargs="?", const=True,
                      help="torch.compile the model [false]")
    return p


_NOT_CONFIG = ("out", "resume", "overwrite", "no_progress")


def parse(argv: Optional[Sequence[str]] = None) -> tuple[Config, Path, bool, bool, bool]:
    """Arguments to ``(config, out, resume, overwrite, progress)``; raises on bad input."""
    args = vars(build_parser().parse_args(argv))
    given = {k: v for k, v in args.items() if k not in _NOT_CONFIG}
    resume = "resume" in args
    if resume:
        from train.checkpoint import read_config

        out = Path(args["resume"])
        if "overwrite" in args:
            raise UsageError("--resume continues a run and --overwrite replaces it; give one")
        if args.get("out") and Path(args["out"]) != out:
            raise UsageError(f"--resume writes into {out}; --out {args['out']} names another folder")
        try:
            stored = Config.from_json(read_config(out))
        except ConfigError as error:
            raise ConfigError(f"{out / 'config.json'}: invalid config ({error})") from None
        config = dataclasses.replace(stored, **given)
    else:
        config = Config(**given)
        out = Path(args.get("out") or f"checkpoints/{config.dataset}-{config.opt}-{config.loss}")
    return config, out, resume, bool(args.get("overwrite")), not args.get("no_progress", False)


def _say(message: str, every_rank: bool = False) -> None:
    """One line on stderr; under torchrun only rank 0 speaks (all ranks see the same input)."""
    rank = os.environ.get("RANK", "0")
    message = one_line(message)
    if every_rank or rank == "0":
        print(message if rank == "0" else f"[rank {rank}] {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from train import distributed
    from train.checkpoint import CheckpointError
    from train.data import DataError
    from train.loop import TrainingDiverged, train

    try:
        config, out, resume, overwrite, progress = parse(argv)
        device = distributed.setup(config.device)  # torchrun: process group, cuda:LOCAL_RANK
        if device is not None:
            config = config.replace(device=device)
        writer = distributed.is_main()
        train(config, out, resume=resume, overwrite=overwrite, progress=progress and writer,
              log=_say, is_writer=writer)
    except distributed.DistributedError as error:
        _say(f"error: {error}", every_rank=True)
        return EXIT_USAGE
    except (UsageError, ConfigError, DataError, CheckpointError) as error:
        _say(f"error: {error}")
        return EXIT_USAGE
    except TrainingDiverged as error:
        _say(f"error: {error}; the last good checkpoint is kept")
        return EXIT_DIVERGED
    except OSError as error:
        where = f"{error.filename}: " if error.filename is not None else ""
        _say(f"error: {where}{error.strerror or error}; earlier checkpoints are intact",
             every_rank=True)
        return EXIT_USAGE
    finally:
        distributed.cleanup()
    if os.environ.get("RANK", "0") == "0":
        print(out)
    return 0
