#!/usr/bin/env python
"""Export ONNX and build TensorRT / AOTInductor engines for a Stable Diffusion model, once.

Same as ``dreamfusion-trt build-engines``; see ``--help`` and engines/README.md. Example:

    python build_scripts/build_engines.py --model stabilityai/stable-diffusion-2-1-base --batch-sizes 2,8,32
    # final engines: longer TensorRT builds, faster kernels
    python build_scripts/build_engines.py --model stabilityai/stable-diffusion-2-1-base --optimization-level 5
"""

import sys
from pathlib import Path

try:
    from dreamfusion_trt.cli import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dreamfusion_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-engines", *sys.argv[1:]]))
