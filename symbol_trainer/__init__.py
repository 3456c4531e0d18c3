"""symbol_trainer: train Keras image classifiers that tell which symbols are visible in frames.

The package holds one module per stage; docs/layout.md draws the tree. The programs'
main() functions live in symbol_trainer.programs; the top-level scripts and the console
commands (build-binary-classifier, build-multi-hot-model, predict-symbols) call them.
Importing the package imports nothing heavy: --help and flag mistakes never wait for
TensorFlow.
"""

__version__ = "1.0.0"
