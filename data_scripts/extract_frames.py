#!/usr/bin/env python
"""Write the frames of every video under SRC as img_00001.jpg ... folders under DST.

Same as `vidkit prepare extract-frames ...`; run with --help for the options, and see README.md in this folder.
The work is done by `vidkit.prepare` (nbs/10*_prepare*.ipynb); the command line is `vidkit.cli_data.prepare_main` (nbs/14_cli.ipynb).
"""
import sys
from pathlib import Path

try: import vidkit  # noqa: F401
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from vidkit.cli_data import prepare_main

if __name__ == '__main__':
    sys.exit(prepare_main(prog=Path(__file__).name, command='extract-frames'))
