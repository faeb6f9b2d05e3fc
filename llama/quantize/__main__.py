"""python -m llama.quantize: see llama/quantize/cli.py."""

from llama.quantize.cli import main

main()
