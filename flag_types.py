"""
argparse value types shared by train_gpt.py's and train_grpo.py's flags. Each checks its value as it is parsed, so a
bad flag is argparse's usage line and one error line that names what is allowed.

    number(int, 1)(text)          a finite int (or float: number(float, ...)) within the bounds
    existing_file, new_file       a file to read; a file that can be written
    folder                        a directory, or a path where one can be made
    run_id                        a run's name: its log is <--log-dir>/<run id>.txt
"""
import argparse
import math
import os


def number(kind, low=None, high=None, low_open=False, high_open=False, why=""):
    """A finite int (kind=int) or float within [low, high]; low_open / high_open exclude the bound."""
    name = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        allowed = f"{name} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{name} {'>' if low_open else '>='} {low}"
    else:
        allowed = name

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or low is not None and (value < low or low_open and value == low)
                or high is not None and (value > high or high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {allowed}{why}, got {text!r}")
        return value
    return parse


def existing_file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def new_file(text):
    parent = os.path.dirname(text) or "."
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text}: cannot write a file there ({parent}: no such directory)")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory")
    return text


def folder(text):
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
    return text


def run_id(text):
    if not text or os.sep in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"must be a file name (no {os.sep}), got {text!r}: the log is "
                                         f"<--log-dir>/<run id>.txt")
    return text
