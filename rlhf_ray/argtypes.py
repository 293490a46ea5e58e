"""Argument types of the command line shared by its subcommands: a bad value is one argparse error line
that names the option and what it expected."""

from __future__ import annotations

import argparse


def _number(text: str, kind: type, what: str, bound: str):
    """`text` as a `kind` that satisfies `bound` ("> 0", ">= 1"...), or an argparse error saying so."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    op, limit = bound.split()
    if not (value > kind(limit) if op == ">" else value >= kind(limit)):
        raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "an integer", ">= 1")


def positive_float(text: str) -> float:
    return _number(text, float, "a number", "> 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number", ">= 0")
