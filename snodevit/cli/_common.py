"""Helpers shared by the subcommands: JSON output, device choice, model loading."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import torch

from snodevit import device as devices
from snodevit.cli.errors import CLIError
from snodevit.inference.precision import PRECISIONS


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures on stdout")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")


def add_precision_flag(p: argparse.ArgumentParser) -> None:
    # "auto" is resolved by snodevit.inference.precision.resolve_precision alone (it reads $SNODEVIT_PRECISION),
    # as the service's is: a default read here would be a second rule
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="forward passes in fp32 or bf16 autocast; auto (default): $SNODEVIT_PRECISION when it names "
                        "fp32 or bf16, else bf16 where the device multiplies bf16 natively (CUDA, AVX512-BF16/AMX "
                        "CPUs), else fp32, as the service resolves it. The onnx backend is fp32")


def resolve_device(name: str) -> torch.device:
    """``--device`` as a device (``snodevit.device.resolve_device``); a refusal names the flag (exit code 2)."""
    try:
        return devices.resolve_device(name)
    except ValueError as e:
        raise CLIError(f"--device {name}: {e}") from None


def emit(args: argparse.Namespace, figures: dict[str, Any], human: str) -> None:
    """Print JSON (with --json) or the human-readable text."""
    if getattr(args, "json", False):
        json.dump(figures, sys.stdout, sort_keys=True, default=float)
        sys.stdout.write("\n")
    else:
        print(human)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` that accepts integers >= ``minimum`` and names the bound when refusing."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v
    return parse


non_negative_int = int_at_least(0)
