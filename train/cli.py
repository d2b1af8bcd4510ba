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
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from train.cli_base import OneLineParser, UsageError, add_threads, one_line, plain, set_threads
from train.config import CHOICES, Config, ConfigError
from train.data import SPECS
from train.models import DEFAULT_WIDTH
from train.options import CACHE_LIMIT_BYTES

__all__ = ["main", "build_parser", "UsageError"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _default(name: str) -> str:
    """``Config``'s default of field ``name`` as the help text shows it."""
    value = _DEFAULTS[name]
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def _per(table: dict, key) -> str:
    """A default that depends on another option: ``"100 for cifar10, cifar100; 40 for digits"``."""
    names: dict[str, list[str]] = {}
    for name, value in table.items():
        names.setdefault(str(key(value)), []).append(name)
    return "; ".join(f"{shown} for {', '.join(which)}" for shown, which in names.items())


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m train", description=plain(__doc__.split("\n\n")[0]),
                      argument_default=argparse.SUPPRESS,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def option(group, name: str, text: str = "", default: Optional[str] = None, **kwargs):
        """``--name``: its choices from train.options, its default from ``Config``."""
        if name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        shown = _default(name) if default is None else default
        group.add_argument(f"--{name}", help=f"{text} [{shown}]".lstrip(), **kwargs)

    flag = {"type": _bool, "nargs": "?", "const": True}
    data = p.add_argument_group("data")
    option(data, "dataset")
    option(data, "data_dir", "folder holding the CIFAR python batches, or (dataset folder) "
           "train/<class>/* and test/<class>/* images, or the images the lists name")
    option(data, "train_list", "dataset folder: a list file, one 'relative/path label' a line; "
           "kept as it is (no imb_factor cut)", default="none: the folders")
    option(data, "test_list", "dataset folder: the test list, as --train_list",
           default="none: the folders")
    option(data, "image_size", "dataset folder: resize the shorter side, then centre-crop to N x N",
           type=int, default="none: images keep their size; 224 with --decode stream")
    option(data, "decode", "dataset folder: decode once into a uint8 cache, or in --workers "
           "DataLoader processes every epoch (RandomResizedCrop + flip; test: resize 8/7, centre "
           f"crop); auto streams when the cache would pass {CACHE_LIMIT_BYTES / 2**30:g} GiB")
    option(data, "workers", "decoding processes with --decode stream (0: in the training "
           "process)", type=int)
    option(data, "imb_factor", "largest / smallest class", type=float)
    option(data, "selection", "which images of a class are kept")
    option(data, "eta", "tail = classes with fewer than eta training images", type=float,
           default=_per(SPECS, lambda spec: spec.default_eta)
           + "; n_max / 5 for folder")
    model = p.add_argument_group("model and loss")
    option(model, "model", default=_per(SPECS, lambda spec: spec.default_model)
           + "; resnet32 for folder; resnet34 under --protocol seed")
    option(model, "width", "MLP units / channels of the first stage", type=int,
           default=_per(DEFAULT_WIDTH, str))
    option(model, "loss")
    option(model, "gamma_vs", "VS loss exponent", type=float)
    option(model, "tau", "VS / LA prior temperature", type=float)
    opt = p.add_argument_group("optimizer")
    option(opt, "protocol", "ours (the paper as written) or seed (the SSE-SAM authors' code: "
           "init, schedule, BatchNorm passes, ImbSAM group means, every-10th-epoch "
           "evaluation with a test-selected best.pt)")
    option(opt, "opt")
    option(opt, "rho", "SAM / ImbSAM radius", type=float)
    option(opt, "head_rho", "SSE-SAM head radius in stage I", type=float)
    option(opt, "tail_rho", "SSE-SAM tail radius", type=float)
    option(opt, "gamma", "SSE-SAM: head_rho applies to epochs < ceil(gamma * epochs)",
           type=float)
    option(opt, "group_reduction", "group losses divided by the batch size or by the group's "
           "size", default="batch; group for imbsam under --protocol seed")
    option(opt, "tail_scale", "factor on the tail loss", type=float,
           default="2 for imbsam (the ImbSAM authors' code), else 1; 1 under --protocol seed")
    option(opt, "bn_update", "BatchNorm running stats from the forward at w only, or from every "
           "forward the seed code runs", default="w; all under --protocol seed")
    option(opt, "perturbation", "under torchrun: e_G from the all-reduced group gradient (one "
           "SAM step over the global batch) or from each rank's own shard (the SAM paper's "
           "per-accelerator practice; one all-reduce a step)")
    option(opt, "epochs", type=int, default=_per(SPECS, lambda spec: spec.default_epochs)
           + "; 200 for folder")
    option(opt, "batch_size", type=int)
    option(opt, "lr", type=float, default=_per(SPECS, lambda spec: f"{spec.default_lr:g}")
           + "; 0.01 for folder")
    option(opt, "momentum", type=float)
    option(opt, "wd", "weight decay", type=float)
    run = p.add_argument_group("run")
    option(run, "seed", type=int)
    option(run, "device", "auto, cpu, cuda or cuda:N")
    run.add_argument("--out", help="run folder [checkpoints/DATASET-OPT-LOSS]")
    option(run, "save_every", "checkpoint every N epochs", type=int)
    option(run, "tta", "evaluate with horizontal-flip test-time augmentation", **flag)
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its newest good checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a run already in --out (only the run's own files are removed)")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_threads(run)
    fast = p.add_argument_group("speed (GPU)")
    option(fast, "channels_last", **flag)
    option(fast, "bf16", "bf16 autocast of forwards and backwards", **flag)
    option(fast, "compile", "torch.compile the model", **flag)
    return p


_NOT_CONFIG = ("out", "resume", "overwrite", "no_progress", "threads")


def parse(argv: Optional[Sequence[str]] = None
          ) -> tuple[Config, Path, bool, bool, bool, list[str]]:
    """Arguments to ``(config, out, resume, overwrite, progress, notices)``; raises on bad
    input. ``notices`` are warning lines for :func:`train.loop.train` to say once it starts."""
    args = vars(build_parser().parse_args(argv))
    given = {k: v for k, v in args.items() if k not in _NOT_CONFIG}
    set_threads(args.get("threads"))
    resume = "resume" in args
    for name in ("out", "resume"):
        if args.get(name) == "":
            raise UsageError(f"--{name} needs a folder; got an empty name")
    if resume:
        from train.checkpoint import read_config

        out = Path(args["resume"])
        if "overwrite" in args:
            raise UsageError("--resume continues a run and --overwrite replaces it; give one")
        if args.get("out") and Path(args["out"]) != out:
            raise UsageError(f"--resume writes into {out}; --out {args['out']} names another "
                             "folder")
        try:
            stored = Config.from_json(read_config(out))
        except ConfigError as error:
            raise ConfigError(f"{out / 'config.json'}: invalid config ({error})") from None
        config = dataclasses.replace(stored, **given)
    else:
        config = Config(**given)
        out = Path(args.get("out") or f"checkpoints/{config.dataset}-{config.opt}-{config.loss}")
    notices = _ignored_warning(config.opt, given)
    return (config, out, resume, bool(args.get("overwrite")), not args.get("no_progress", False),
            notices)


def _ignored_warning(opt: str, given) -> list[str]:
    """One warning line for the optimizer settings given that ``opt`` does not read
    (:func:`train.optim.ignored_flags`); said once training starts, which it does."""
    from train.optim import ignored_flags

    ignored = ignored_flags(opt, given)
    flags = ", ".join(f"--{name}" for name in ignored)
    return [f"warning: --opt {opt} ignores {flags}"] if ignored else []


def _say(message: str, every_rank: bool = False) -> None:
    """One line on stderr; under torchrun only rank 0 speaks (all ranks see the same input)."""
    rank = os.environ.get("RANK", "0")
    message = one_line(message)
    if every_rank or rank == "0":
        print(message if rank == "0" else f"[rank {rank}] {message}", file=sys.stderr)


def _interrupted(out: Optional[Path]) -> str:
    """The line after a Ctrl-C: the newest checkpoint, and how to go on from it."""
    from tqdm import tqdm

    from train.checkpoint import list_checkpoints

    for bar in list(getattr(tqdm, "_instances", ())):  # clear a progress bar's line first
        bar.close()
    found = list_checkpoints(out) if out is not None else []
    if not found:
        return "interrupted before any checkpoint was written"
    return (f"interrupted; the last checkpoint is {found[-1][1]}: continue with python -m train "
            f"--resume {shlex.quote(str(out))}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from train import distributed
    from train.checkpoint import CheckpointError
    from train.data import DataError
    from train.loop import TrainingDiverged, train
    from train.run_folder import RunBusy

    out = None
    try:
        config, out, resume, overwrite, progress, notices = parse(argv)
        device = distributed.setup(config.device)  # torchrun: process group, cuda:LOCAL_RANK
        if device is not None:
            config = config.replace(device=device)
        writer = distributed.is_main()
        train(config, out, resume=resume, overwrite=overwrite, progress=progress and writer,
              log=_say, is_writer=writer, notices=notices)
    except distributed.DistributedError as error:
        _say(f"error: {error}", every_rank=True)
        return EXIT_USAGE
    except (UsageError, ConfigError, DataError, CheckpointError, RunBusy) as error:
        _say(f"error: {error}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say(_interrupted(out))
        return EXIT_INTERRUPTED
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
