#!/usr/bin/env python3
"""Find the symbols a trained model knows in new frames and videos.

The program lives in symbol_trainer/programs/predict.py (run it with --help for its flags);
this script runs it from a checkout, as the console command does from an installed copy.
"""

import sys

from symbol_trainer.programs.predict import build_parser, main

__all__ = ["build_parser", "main"]  # tests use both

if __name__ == "__main__":
    sys.exit(main())
