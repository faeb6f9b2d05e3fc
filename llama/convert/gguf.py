"""GGUF files (llama.cpp's format), read and dequantized with the `gguf` package.

llama.cpp stores a Llama's q/k projections with rotary pairs interleaved,
Meta's layout (its converter undoes Hugging Face's permutation), so tensors
are used as stored once dequantized.
"""

import logging
from pathlib import Path

import numpy as np
import torch

from llama.convert import ffn_params, meta_tensor_names
from llama.model import apply_llama31_scaling
from llama.convert.vocab import GGUF_PRE_TOKENIZER_PATTERNS, byte_level_ranks, make_config, write_ranks

logger = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}  # fmt: skip
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special tokens
_REQUIRED = object()


class GGUFSource:
    def __init__(self, path: Path):
        try:
            from gguf import GGUFReader
        except ImportError as e:
            raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from e
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file (no GGUF magic at its start)")
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # the gguf package raises assorted errors on a damaged file
            raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
        self.path = path
        architecture = self._field("general.architecture")
        if architecture != "llama":
            raise ValueError(f"{path} holds a {architecture!r} model; only 'llama' models convert")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.params = self._params()
        self.tensor_names = meta_tensor_names(self.params["n_layers"])
        missing = sorted({self._gguf_name(n) for n in self.tensor_names} - self.tensors.keys())
        if missing:
            raise ValueError(f"{path} lacks tensors {', '.join(missing[:8])}: truncated or not a complete model")

    def _field(self, key: str, default=_REQUIRED):
        field = self.reader.fields.get(key)
        if field is not None:
            return field.contents()
        if default is _REQUIRED:
            raise ValueError(f"{self.path} lacks the metadata key {key!r}: not a complete Llama GGUF file")
        return default

    def _params(self) -> dict:
        dim = self._field("llama.embedding_length")
        n_heads = self._field("llama.attention.head_count")
        if self._field("llama.rope.dimension_count", dim // n_heads) != dim // n_heads:
            raise ValueError(f"{self.path}: partial rotary embeddings are not part of the Llama architecture")
        vocab_size = self._field("llama.vocab_size", None) or len(self._field("tokenizer.ggml.tokens"))
        rope_theta = float(self._field("llama.rope.freq_base", 10000.0))
        use_scaled_rope = "rope_freqs.weight" in self.tensors  # llama.cpp's Llama 3.1 frequency factors
        if use_scaled_rope:
            self._check_llama31_rope_factors(dim // n_heads, rope_theta)
        return {
            "dim": dim,
            "n_layers": self._field("llama.block_count"),
            "n_heads": n_heads,
            "n_kv_heads": self._field("llama.attention.head_count_kv", n_heads),
            "vocab_size": vocab_size,
            **ffn_params(dim, self._field("llama.feed_forward_length")),
            "norm_eps": float(self._field("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": rope_theta,
            "use_scaled_rope": use_scaled_rope,
            "max_position_embeddings": self._field("llama.context_length", None),  # the context it was trained for
        }

    def _check_llama31_rope_factors(self, head_dim: int, theta: float) -> None:
        """llama.cpp divides each rotary frequency by a stored factor; ours is Llama 3.1's fixed scaling."""
        factors = torch.from_numpy(np.asarray(self.tensors["rope_freqs.weight"].data, dtype=np.float32))
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        expected = freqs / apply_llama31_scaling(freqs)
        if factors.shape != expected.shape or not torch.allclose(factors, expected, rtol=1e-4):
            raise ValueError(f"{self.path}: rope frequency factors differ from Llama 3.1's scaling; not supported")

    def _gguf_name(self, meta_name: str) -> str:
        if meta_name == "output.weight" and "output.weight" not in self.tensors:
            return "token_embd.weight"  # tied embeddings: the output projection is the embedding
        if meta_name in _TOP_NAMES:
            return _TOP_NAMES[meta_name]
        _, layer, rest = meta_name.split(".", 2)
        return f"blk.{layer}.{_LAYER_NAMES[rest]}"

    def load(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self.tensors[self._gguf_name(name)]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)  # float32, (out_features, in_features)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {e}") from e
        return torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is mapped read-only

    def write_tokenizer(self, directory: Path) -> None:
        model = self._field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{self.path}: tokenizer {model!r} is not supported; only byte-level BPE ('gpt2')")
        pre = self._field("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZER_PATTERNS:
            raise ValueError(f"{self.path}: pre-tokenizer {pre!r} is not supported ({sorted(GGUF_PRE_TOKENIZER_PATTERNS)})")
        tokens = self._field("tokenizer.ggml.tokens")
        types = self._field("tokenizer.ggml.token_type")
        special = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)}
        ranks = byte_level_ranks(tokens, special.values(), self._field("tokenizer.ggml.merges"))
        write_ranks(directory / "tokenizer.model", ranks)
        eos_ids = [self._field("tokenizer.ggml.eos_token_id", None), self._field("tokenizer.ggml.eot_token_id", None)]
        config = make_config(
            pattern=GGUF_PRE_TOKENIZER_PATTERNS[pre],
            special_tokens=special,
            bos_id=self._field("tokenizer.ggml.bos_token_id", None),
            eos_ids=[i for i in eos_ids if i is not None],
            pad_id=self._field("tokenizer.ggml.padding_token_id", None),
            add_bos=bool(self._field("tokenizer.ggml.add_bos_token", True)),
            chat_template=self._field("tokenizer.chat_template", None),
        )
        config.save(directory / "tokenizer_config.json")
