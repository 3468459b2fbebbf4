"""Command-line help for avalanche-tsn's scripts (examples and benchmarks).

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) has many settings; every script's
``--help`` states each option's default, or where it comes from when a scenario decides it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

__all__ = ["show_defaults"]


def show_defaults(
    parser: argparse.ArgumentParser, scenario_dependent: Iterable[str] = ()
) -> argparse.ArgumentParser:
    """End every option's help line with its default; return the parser.

    :param parser: a script's parser, every option added.
    :param scenario_dependent: destinations whose default the chosen scenario sets.
    """
    scenario = set(scenario_dependent)
    for action in parser._actions:  # (argparse keeps no public list of its options)
        if not action.option_strings or action.dest == "help":
            continue
        text = action.help or ""
        if "default" in text:
            continue
        if action.dest in scenario:
            note = "default: the scenario's"
        elif action.nargs == 0:
            note = "default: off" if not action.default else "default: on"
        elif action.default is None:
            note = "default: none"
        else:
            note = "default: %(default)s"
        action.help = f"{text} ({note})" if text else note
    return parser
