"""The CLI's argument parser: argparse's, naming an unknown option before a missing argument.

argparse checks required positionals before it reports unknown options, so `qlora train
--bogus-flag` said only "the following arguments are required: recipe", hiding the typo. `Parser`
reports the options it does not know first (`Parser.argv` is the command line `qlora.cli.main`
parses).
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    argv: list[str] = []

    def error(self, message: str) -> NoReturn:
        if "arguments are required" in message:
            unknown = [a for a in self.argv
                       if a.startswith("-") and a != "-" and a.split("=", 1)[0] not in self._option_string_actions]
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        super().error(message)
