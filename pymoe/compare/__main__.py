"""python -m pymoe.compare: route the same router logits under several presets, print the table.

    python -m pymoe.compare --tokens 256 --experts 16 --k 2 --capacity-factor 1.0
    python -m pymoe.compare --logits my_logits.npy --presets mixtral,megatron,deepspeed-topk
    python -m pymoe.compare --capacity-factor none --plot presets.png

Without --logits, the logits are random normal with expert e shifted by -skew * e (a router that
favours low experts, so capacity drops something). docs/conventions.md explains the differences.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from .._checks import cli_int, output_path
from ..options import RouteOptions, add_flags, flag_values
from ..variants.presets import presets
from . import compare


def _factor(text: str) -> float | None:
    return None if text.lower() in ("none", "dropless") else float(text)


def _load_logits(ap: argparse.ArgumentParser, path: str) -> np.ndarray:
    """--logits: a .npy file of a numeric [T, E] array; anything else is a one-line error. No
    pickle is ever loaded (allow_pickle stays False: loading one would run its code)."""
    try:
        logits = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        ap.error(f"argument --logits: no such file {path!r}")
    except (OSError, ValueError, EOFError) as err:  # empty, a pickle, an object array, not .npy
        ap.error(f"argument --logits: {path!r} is not a .npy array file without pickled data "
                 f"({err})")
    if not isinstance(logits, np.ndarray):  # an .npz archive
        ap.error(f"argument --logits: {path!r} holds several arrays (.npz); save one [T, E] "
                 "array with np.save")
    return logits


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m pymoe.compare",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--logits", help="a .npy file holding [T, E] router logits")
    ap.add_argument("--tokens", type=cli_int(1), default=128, help="T for random logits (default 128)")
    ap.add_argument("--experts", type=cli_int(1), default=16, help="E for random logits (default 16; "
                    "deepseek-v3 needs a multiple of 8 with at least 2 experts per group)")
    ap.add_argument("--skew", type=float, default=0.15,
                    help="random logits: expert e shifted by -skew * e (default 0.15)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random logits")
    ap.add_argument("--k", type=cli_int(1), default=2, help="choices per token (default 2)")
    ap.add_argument("--capacity-factor",
                    help="shared capacity factor, or 'none' for dropless (default: each "
                         "preset's own)")
    flags = add_flags(ap, RouteOptions)  # the shared routing keywords (pymoe.options)
    ap.add_argument("--presets", default=",".join(presets()),
                    help="comma-separated names, the first is the reference (default: all)")
    ap.add_argument("--plot", help="also draw the comparison to this PNG (pymoe.viz)")
    args = ap.parse_args(argv)
    if args.plot:
        try:
            output_path("--plot", args.plot)
        except (TypeError, ValueError) as err:
            ap.error(f"argument {err}")
    if args.logits:
        logits = _load_logits(ap, args.logits)
    else:
        rng = np.random.default_rng(args.seed)
        logits = rng.normal(size=(args.tokens, args.experts)) - args.skew * np.arange(args.experts)
    shared = {"k": args.k}
    if args.capacity_factor is not None:
        try:
            shared["capacity_factor"] = _factor(args.capacity_factor)
        except ValueError:
            ap.error(f"argument --capacity-factor: expected a number or 'none', got "
                     f"{args.capacity_factor!r}")
    shared.update(flag_values(args, flags))
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    try:
        with warnings.catch_warnings():  # the table's own "note:" lines say it
            warnings.filterwarnings("ignore", message="compare: preset ")
            result = compare(logits, names, **shared)
    except (ValueError, TypeError) as err:
        ap.error(str(err))
    print(result.table())
    if args.plot:
        from .. import viz

        viz.preset_differences(result, args.plot)
        if viz.have_matplotlib():
            print(f"picture: {args.plot}")
        else:  # viz printed the text form above instead
            print(f"picture: none written to {args.plot} ({viz.no_picture_reason()}); its text "
                  "form is above", file=sys.stderr)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
