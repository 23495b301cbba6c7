"""A replica's start is quiet: `deployments/__init__.py` drops the library warnings no operator
can act on (torchao's unloadable kernels, torch's pytree deprecation about torchao's enums,
diffusers' old torchao classes, transformers' torchvision fallback), and only those: the same
loggers' other warnings, the same texts on other loggers, and `warnings.warn` all still show.

One fresh interpreter imports the package, then torchao and the pipeline module (where the
noise is printed, at import), then emits real warnings, as a replica would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DONE = "quiet-start: imports done"

SCRIPT = f"""
import enum, logging, sys, warnings

import deployments  # the filters, before any library
import torchao
import deployments.generator.model.pipelines as pipelines

pipelines.pipeline_class_named("StableDiffusion3Pipeline")
pipelines.pipeline_class_named("FluxPipeline")
print({DONE!r}, file=sys.stderr, flush=True)

import torch.utils._pytree as pytree

class OurMode(str, enum.Enum):
    A = "a"

pytree.register_constant(OurMode)  # the same deprecation, about an enum not torchao's
logging.getLogger("torchao").warning("Failed to load /srv/torchao/_C.abi3.so: not ours to hide")
logging.getLogger("transformers.utils.import_utils").warning("transformers still speaks")
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").warning("diffusers too")
logging.getLogger("deployments.elsewhere").warning(
    "Unable to import `torchao` Tensor objects. This may affect loading (another logger)"
)
warnings.warn("a real UserWarning", UserWarning, stacklevel=1)
"""

# What the filters hide: a piece of each message as the libraries print it.
SILENCED = (
    "torchao/_C_mxfp8",
    "torchao/_C_cutlass_90a",
    "<enum 'KernelPreference'> is an Enum subclass",
    "<enum 'ScaleCalculationMode'> is an Enum subclass",
    "Unable to import `torchao` Tensor objects. This may affect loading checkpoints",
    "requires torchvision (not installed); falling back to",
)

# What must still show: the script's real warnings, after the imports.
STILL_SHOWN = (
    "<enum 'OurMode'> is an Enum subclass",
    "Failed to load /srv/torchao/_C.abi3.so: not ours to hide",
    "transformers still speaks",
    "diffusers too",
    "Unable to import `torchao` Tensor objects. This may affect loading (another logger)",
    "UserWarning: a real UserWarning",
)


@pytest.fixture(scope="module")
def stderr() -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert DONE in done.stderr, done.stderr[-3000:]
    return done.stderr


@pytest.mark.parametrize("message", SILENCED)
def test_the_known_noise_is_gone(stderr, message):
    assert message not in stderr, stderr[-3000:]


@pytest.mark.parametrize("message", STILL_SHOWN)
def test_real_warnings_still_show(stderr, message):
    assert message in stderr.split(DONE)[1], stderr[-3000:]
