"""Command line: python -m llama.quantize SRC DST --mode MODE [--group-size G] [--gptq]"""

import argparse
import logging
from pathlib import Path
from typing import List, Optional

from llama.quantize.checkpoint import default_calibration_text, quantize_checkpoint
from llama.quantize.kernels import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES
from llama.quantize.transform import MODES

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llama.quantize", description="Quantize a Meta-format checkpoint directory."
    )
    parser.add_argument("src", type=Path, help="checkpoint directory (params.json, consolidated.NN.pth)")
    parser.add_argument("dst", type=Path, help="new directory for the quantized checkpoint")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help=f"int4: input columns per (scale, zero), one of {INT4_GROUP_SIZES} "
                        f"(default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--gptq", action="store_true",
                        help="int8: choose the codes with GPTQ, calibrated on a text shipped with the library "
                        "(slower: ~1 minute for 135M parameters on 2 cores; closer to fp32)")
    parser.add_argument("--calibration-text", type=Path, default=None,
                        help="with --gptq: a UTF-8 text file to calibrate on instead (its first 1024 tokens)")
    args = parser.parse_args(argv)
    if args.calibration_text is not None and not args.gptq:
        parser.error("--calibration-text goes with --gptq")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    calibration = None
    if args.gptq:
        calibration = (args.calibration_text.read_text(encoding="utf-8") if args.calibration_text
                       else default_calibration_text())
    quantize_checkpoint(args.src, args.dst, args.mode, args.group_size, calibration)
    logger.info("wrote %s (%s)", args.dst, args.mode)
