"""The image service's package; importing it first quiets known, harmless library noise.

Every Ray process that runs our code (the application's build task, each replica) imports
this package before torch, torchao, diffusers or transformers, which log a few warnings on
every start that no operator of this service can act on. Each is dropped here, at its
logger, by the logger's name and the message's text: nothing else from those loggers, and
no `warnings.warn` warning, is touched. Only `logging` and `re` are imported: the ingress
imports this package too and must not import torch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable


class _DropMessage(logging.Filter):
    """Drops the records whose message matches `pattern` (and `also`, when given)."""

    def __init__(
        self, pattern: str, also: Callable[[logging.LogRecord], bool] | None = None
    ) -> None:
        super().__init__()
        self._pattern = re.compile(pattern)
        self._also = also

    def filter(self, record: logging.LogRecord) -> bool:
        matches = self._pattern.search(record.getMessage()) is not None
        if matches and self._also is not None:
            matches = self._also(record)
        return not matches


def _about_a_torchao_class(record: logging.LogRecord) -> bool:
    """The record's first argument is a class of torchao's (not ours, nor another library's)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return bool(args) and getattr(args[0], "__module__", "").startswith("torchao.")


_QUIETED: tuple[tuple[str, _DropMessage], ...] = (
    # torchao's import tries its prebuilt CUDA kernels: 2:4-sparse float8 matmuls for SM90
    # and MX-fp8 casts for MoE training (built for CPython 3.10). They never load on a CPU
    # torch or on Python 3.11, and neither backs the quantizations we offer (dense int8 and
    # float8 weights). Any other torchao file failing to load, or torchao skipping its
    # kernels for an old torch, still shows.
    ("torchao", _DropMessage(r"^Failed to load \S*/torchao/_C_(cutlass_90a|mxfp8)\.\S*\.so: ")),
    # torchao registers its own enums (KernelPreference, ScaleCalculationMode) as pytree
    # constants, which torch now deprecates; only a torchao release can change that call.
    # The same deprecation about any other library's enum, or ours, still shows.
    (
        "torch.utils._pytree",
        _DropMessage(
            r"is an Enum subclass and is now natively supported by torch\.compile",
            also=_about_a_torchao_class,
        ),
    ),
    # diffusers registers old torchao tensor classes that newer torchao no longer has, for
    # unpickling `.bin` checkpoints quantized by torchao. We quantize at load (or read
    # safetensors), and a pickled checkpoint that needed them fails naming the class anyway.
    (
        "diffusers.quantizers.torchao.torchao_quantizer",
        _DropMessage(r"^Unable to import `torchao` Tensor objects\. This may affect loading"),
    ),
    # diffusers' pipeline modules import transformers' image processors (IP-adapter inputs,
    # unused here); without torchvision, transformers hands over the PIL ones, which are the
    # classes these names meant before its refactor. Installing torchvision is not wanted:
    # it must match the torch build. Any other warning of that module still shows.
    (
        "transformers.utils.import_utils",
        _DropMessage(
            r"^`\w+ImageProcessor` requires torchvision \(not installed\); "
            r"falling back to `\w+ImageProcessorPil`"
        ),
    ),
)

for _logger_name, _filter in _QUIETED:
    logging.getLogger(_logger_name).addFilter(_filter)
