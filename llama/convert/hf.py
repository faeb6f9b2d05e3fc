"""Hugging Face Llama directories: config.json, *.safetensors, tokenizer files."""

import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import safe_open

from llama.convert import ffn_params, meta_tensor_names, unpermute_rotate_half
from llama.convert.vocab import byte_level_ranks, make_config, pattern_from_hf_pre_tokenizer, write_ranks

logger = logging.getLogger(__name__)

# Meta name (per layer, after "layers.{i}.") -> Hugging Face name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}  # fmt: skip
# Llama 3.1's rope scaling, the only one the model implements (llama/model.py apply_llama31_scaling).
_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class HuggingFaceSource:
    def __init__(self, directory: Path):
        self.directory = directory
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model directory")
        self.config = json.loads(config_path.read_text())
        self.params = self._params()
        self.tensor_names = meta_tensor_names(self.params["n_layers"])
        self._files = self._weight_files()  # HF tensor name -> safetensors file
        self._tied = "lm_head.weight" not in self._files
        if self._tied and not self.config.get("tie_word_embeddings", False):
            raise ValueError(f"{directory}: no lm_head.weight in the safetensors files, and embeddings are not tied")
        missing = sorted({self._hf_name(n) for n in self.tensor_names} - self._files.keys())
        if missing:
            raise ValueError(f"{directory}: tensors missing from the safetensors files: {', '.join(missing[:8])}")

    def _params(self) -> dict:
        c = self.config
        if c.get("model_type") not in ("llama", None) and "LlamaForCausalLM" not in c.get("architectures", []):
            raise ValueError(f"{self.directory}: model_type {c.get('model_type')!r} is not a Llama model")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError(f"{self.directory}: biases in attention or MLP are not part of the Llama architecture")
        dim, n_heads = c["hidden_size"], c["num_attention_heads"]
        if c.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"{self.directory}: head_dim {c['head_dim']} != hidden_size / num_attention_heads")
        rope = dict(c.get("rope_parameters") or {})  # transformers >= 5
        rope.update(c.get("rope_scaling") or {})  # transformers 4
        rope_theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            if any(float(rope.get(k, -1)) != v for k, v in _LLAMA31_ROPE.items()):
                raise ValueError(f"{self.directory}: llama3 rope scaling {rope} differs from Llama 3.1's {_LLAMA31_ROPE}")
        elif rope_type != "default":
            raise ValueError(f"{self.directory}: rope scaling {rope_type!r} is not supported (only Llama 3.1's)")
        return {
            "dim": dim,
            "n_layers": c["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": c.get("num_key_value_heads", n_heads),
            "vocab_size": c["vocab_size"],
            **ffn_params(dim, c["intermediate_size"]),
            "norm_eps": c.get("rms_norm_eps", 1e-6),
            "rope_theta": float(rope_theta),
            "use_scaled_rope": rope_type == "llama3",
            "max_position_embeddings": c.get("max_position_embeddings"),  # the context it was trained for
        }

    def _weight_files(self) -> Dict[str, Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.directory / file for name, file in weight_map.items()}
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory} has no *.safetensors weights")
        names = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                names.update({name: file for name in f.keys()})
        return names

    def _hf_name(self, meta_name: str) -> str:
        if meta_name == "output.weight" and self._tied:
            return _TOP_NAMES["tok_embeddings.weight"]  # tied: the output projection is the embedding
        if meta_name in _TOP_NAMES:
            return _TOP_NAMES[meta_name]
        _, layer, rest = meta_name.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"

    def load(self, name: str) -> torch.Tensor:
        hf_name = self._hf_name(name)
        with safe_open(self._files[hf_name], framework="pt") as f:
            tensor = f.get_tensor(hf_name)
        if name.endswith("attention.wq.weight"):
            tensor = unpermute_rotate_half(tensor, self.params["n_heads"])
        elif name.endswith("attention.wk.weight"):
            tensor = unpermute_rotate_half(tensor, self.params["n_kv_heads"])
        return tensor

    def write_tokenizer(self, directory: Path) -> None:
        sentencepiece_model = self.directory / "tokenizer.model"
        tokenizer_json = self.directory / "tokenizer.json"
        if tokenizer_json.is_file() and json.loads(tokenizer_json.read_text())["model"]["type"] == "BPE":
            self._write_byte_level_bpe(json.loads(tokenizer_json.read_text()), directory)
        elif sentencepiece_model.is_file():
            shutil.copy2(sentencepiece_model, directory / "tokenizer.model")  # SentencePiece (Llama 2): as is
        else:
            raise FileNotFoundError(f"{self.directory} has no tokenizer.json or tokenizer.model")

    def _write_byte_level_bpe(self, tokenizer: dict, directory: Path) -> None:
        model = tokenizer["model"]
        if model.get("byte_fallback"):  # SentencePiece-style BPE in tokenizer.json
            source = self.directory / "tokenizer.model"
            if not source.is_file():
                raise ValueError(f"{self.directory}: byte-fallback BPE without its SentencePiece tokenizer.model")
            shutil.copy2(source, directory / "tokenizer.model")
            return
        vocab: Dict[str, int] = dict(model["vocab"])
        special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
        vocab.update(special)
        tokens = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            tokens[i] = token
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        ranks = byte_level_ranks(tokens, special.values(), merges)
        write_ranks(directory / "tokenizer.model", ranks)

        tokenizer_config = self._json("tokenizer_config.json")
        generation_config = self._json("generation_config.json")
        eos_ids = generation_config.get("eos_token_id", self.config.get("eos_token_id"))
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        eos_ids += [special[t] for t in [_token_text(tokenizer_config.get("eos_token"))] if t in special]
        bos_id = self.config.get("bos_token_id", generation_config.get("bos_token_id"))
        add_bos = tokenizer_config.get("add_bos_token", _post_processor_adds_bos(tokenizer, bos_id))
        config = make_config(
            pattern=pattern_from_hf_pre_tokenizer(tokenizer.get("pre_tokenizer")),
            special_tokens=special,
            bos_id=bos_id,
            eos_ids=[i for i in dict.fromkeys(eos_ids) if i is not None],
            pad_id=self.config.get("pad_token_id"),
            add_bos=bool(add_bos),
            chat_template=self._chat_template(tokenizer_config),
        )
        config.save(directory / "tokenizer_config.json")

    def _chat_template(self, tokenizer_config: dict) -> Optional[str]:
        """transformers >= 4.43 may save the template as chat_template.jinja instead."""
        template_file = self.directory / "chat_template.jinja"
        return template_file.read_text() if template_file.is_file() else tokenizer_config.get("chat_template")

    def _json(self, name: str) -> dict:
        path = self.directory / name
        return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token


def _post_processor_adds_bos(tokenizer: dict, bos_id: Optional[int]) -> bool:
    """Whether tokenizer.json's post-processor prepends BOS (as Llama 3's TemplateProcessing does)."""
    processor = tokenizer.get("post_processor") or {}
    processors = processor.get("processors", [processor])
    for p in processors:
        for special in (p.get("special_tokens") or {}).values():
            if bos_id in special.get("ids", []):
                return True
    return False
