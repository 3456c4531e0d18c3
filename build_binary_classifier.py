#!/usr/bin/env python3
"""Train a model that tells whether one symbol is visible in a frame.

The program lives in symbol_trainer/programs/build_binary_classifier.py (run it with --help for its flags);
this script runs it from a checkout, as the console command does from an installed copy.
"""

import sys

from symbol_trainer.programs.build_binary_classifier import build_parser, main

__all__ = ["build_parser", "main"]  # tests use both

if __name__ == "__main__":
    sys.exit(main())
