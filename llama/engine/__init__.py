"""The decoding engine, in the spirit of nano-vllm's `engine/`:

    sequence.py       Sequence (one row: prompt, tokens, stop rules) and Request (sequences sampled together)
    stopping.py       StopCriteria: stop tokens, stop strings, the length limit
    sampler.py        Sampler: each request's next tokens with its controls and generator, log-probabilities
    kv_cache.py       CacheRows: which sequence owns which KV-cache row, and the moves that keep rows compacted
    prefix_cache.py   PrefixIndex: automatic prefix caching (hashed blocks of keys and values, LRU)
    model_runner.py   ModelRunner: prefill and decode_step (compiled if asked), in lockstep under torchrun
    engine.py         Engine: add / abort / step, the one decoding loop
"""

from llama.engine.engine import Engine, TokenOutput
from llama.engine.kv_cache import CacheLayout
from llama.engine.model_runner import ModelRunner, Step, compile_decode_step
from llama.engine.sequence import Request, Sequence
from llama.engine.stopping import StopCriteria

__all__ = ["CacheLayout", "Engine", "ModelRunner", "Request", "Sequence", "Step", "StopCriteria", "TokenOutput",
           "compile_decode_step"]
