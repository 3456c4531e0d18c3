"""Keras and its backend, imported once and quietly: every module that uses them imports
them from here (`from symbol_trainer.backend import keras, tf`), so TensorFlow's start-up
notices never bury the one error line a user must read.

`BACKEND` is the Keras backend of this process ("tensorflow", "jax" or "torch", chosen by
KERAS_BACKEND or keras.json as Keras chooses it). `tf` is TensorFlow under the TensorFlow
backend and None under the others, which never import it: code for a feature that exists
only in TensorFlow calls `require_tensorflow` first, which names the feature in its error.
"""

from __future__ import annotations

import os
import sys

from symbol_trainer import dependencies
from symbol_trainer.dependencies import configured_backend
from symbol_trainer.errors import BackendError


def _import_tensorflow_quietly():
    """Import TensorFlow with its start-up lines on stderr held back.

    TensorFlow 2.20+ prints oneDNN and CUDA notices before its logging is initialised, so no
    environment variable silences them, and they bury the one error line a user must read.
    They are replayed if the import fails, and not captured at all when the user asked for
    TensorFlow's logs by setting TF_CPP_MIN_LOG_LEVEL to 0 or 1.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("0", "1"):
        import tensorflow
        return tensorflow
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
            tensorflow.config.list_physical_devices()  # the CUDA probe prints here, once
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tensorflow


BACKEND = configured_backend()
tf = _import_tensorflow_quietly() if BACKEND == "tensorflow" else None
import keras  # noqa: E402  (after TensorFlow, which Keras imports as its backend)

if keras.backend.backend() != BACKEND:  # Keras resolved it differently: a bug of ours
    raise RuntimeError(f"Keras runs under {keras.backend.backend()!r}, the tool expected "
                       f"{BACKEND!r}")


def require_tensorflow(feature: str) -> None:
    """Raise BackendError when the active backend is not TensorFlow: `feature` (for example
    "--export saved_model") exists only there."""
    dependencies.require_tensorflow(feature, BACKEND)


__all__ = ["BACKEND", "BackendError", "keras", "require_tensorflow", "tf"]
