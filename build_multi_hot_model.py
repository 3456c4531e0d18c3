#!/usr/bin/env python3
"""Train one model that tells, for every symbol at once, whether it is visible in a frame.

The program lives in symbol_trainer/programs/build_multi_hot_model.py (run it with --help for its flags);
this script runs it from a checkout, as the console command does from an installed copy.
"""

import sys

from symbol_trainer.programs.build_multi_hot_model import build_parser, main

__all__ = ["build_parser", "main"]  # tests use both

if __name__ == "__main__":
    sys.exit(main())
