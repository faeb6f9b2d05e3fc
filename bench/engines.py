"""The engines a worker measures: ours (`Llama.build` with a configuration) and the peers
(transformers, llama.cpp, Meta's reference), each behind the interface of `Engine`."""

import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from bench.meters import measure_load, synchronizer


class Unsupported(Exception):
    """A workload this engine cannot run (reported, not fatal)."""


@dataclass
class Run:
    seconds: float  # the whole call, every row's tokens on the host
    tokens: List[List[int]]  # new tokens of each row
    generated: int  # new tokens produced in all (Meta's loop gives shorter prompts more)


def bytes_read_per_token(model: torch.nn.Module, embeddings) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter and persistent
    buffer once (quantized weights and their scales as stored), but one row of each
    embedding table. A tied output projection is counted whole (it is read whole)."""
    embedding_ids = {id(m) for m in embeddings}
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        tensors += [b for name, b in module.named_buffers(recurse=False) if name not in module._non_persistent_buffers_set]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if id(module) in embedding_ids:
            nbytes //= module.weight.shape[0]
        total += nbytes
    return total


class Engine:
    """One engine, as the worker drives it, from the worker's spec (device, dtype, paths):

    `prepare(max_seq_len, max_batch_size)` loads it (again only where these sizes matter)
    and returns the load figures, or None when it was loaded already;
    `bytes_per_token()` is the bytes of weights a batch-1 decode step reads;
    `run(prompts, n)` is one timed greedy generation of n new tokens per row.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.sync = synchronizer(self.device)


class OursEngine(Engine):
    """`Llama.build` with a configuration's keyword arguments; a fixed-length greedy decode."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.generator = None
        self.built_for = None

    def prepare(self, max_seq_len: int, max_batch_size: int) -> Optional[dict]:
        """Builds for these cache sizes (rebuilds if they differ); returns load figures."""
        if self.built_for == (max_seq_len, max_batch_size):
            return None
        from llama import Llama

        if self.generator is not None:  # free the previous build, compiled graphs included
            self.generator = None
            torch._dynamo.reset()
            gc.collect()
        self.generator, info = measure_load(self.device, lambda: Llama.build(
            ckpt_dir=self.spec["ckpt_dir"],
            tokenizer_path=self.spec["tokenizer_path"],
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            device=self.device,
            dtype=self.spec["dtype"],
            **self.spec["build_kwargs"],
        ))
        self.built_for = (max_seq_len, max_batch_size)
        return info

    def bytes_per_token(self) -> int:
        model = self.generator.model
        return bytes_read_per_token(model, [model.tok_embeddings])

    def run(self, prompts: List[List[int]], n: int) -> Run:
        # The public API, greedy; min_gen_len = n forbids stop tokens before n tokens
        # (transformers' min_new_tokens), so every row gets exactly n: a fixed-length run.
        self.sync()
        t0 = time.perf_counter()
        rows, _ = self.generator.generate(prompts, max_gen_len=n, temperature=0.0, top_p=1.0, min_gen_len=n)
        self.sync()
        return Run(time.perf_counter() - t0, rows, sum(map(len, rows)))


def left_padded(prompts: List[List[int]], pad_id: int):
    """(ids, attention mask), both (B, longest prompt): transformers' way of batching prompts."""
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    return ids, mask


class TransformersEngine(Engine):
    """transformers' `generate` on the same GGUF, dequantized to the same dtype."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.model = None

    def prepare(self, max_seq_len: int, max_batch_size: int) -> Optional[dict]:
        if self.model is not None:
            return None  # a dynamic cache: nothing sized in advance
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        gguf = Path(self.spec["gguf"])
        dtype = getattr(torch, self.spec["dtype"])
        self.model, info = measure_load(self.device, lambda: AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtype).to(self.device).eval())
        self.pad_id = self.model.generation_config.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.model.generation_config.eos_token_id
        return info

    def bytes_per_token(self) -> int:
        embeddings = [m for m in self.model.modules() if isinstance(m, torch.nn.Embedding)]
        return bytes_read_per_token(self.model, embeddings)

    @torch.inference_mode()
    def run(self, prompts: List[List[int]], n: int) -> Run:
        ids, mask = left_padded(prompts, self.pad_id)
        length = ids.shape[1]
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.sync()
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, temperature=None, top_p=None, top_k=None,
            max_new_tokens=n, min_new_tokens=n,  # fixed length: end-of-sequence is masked until n
            pad_token_id=self.pad_id,
        )
        self.sync()
        seconds = time.perf_counter() - t0
        rows = out[:, length:].tolist()
        return Run(seconds, rows, sum(map(len, rows)))


class LlamaCppEngine(Engine):
    """llama.cpp (llama-cpp-python) on the GGUF as it is (Q4_1), one sequence at a time."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.llm = None

    def prepare(self, max_seq_len: int, max_batch_size: int) -> Optional[dict]:
        if self.llm is not None:
            return None
        from llama_cpp import Llama as LlamaCpp

        self.llm, info = measure_load(torch.device("cpu"), lambda: LlamaCpp(
            model_path=self.spec["gguf"], n_ctx=self.spec["max_context"], n_batch=512,
            n_threads=self.spec["threads"], n_threads_batch=self.spec["threads"],
            n_gpu_layers=-1 if self.spec["device"].startswith("cuda") else 0, seed=0, verbose=False,
        ))
        return info

    def bytes_per_token(self) -> int:
        """Bytes of the GGUF's tensors, one row of the token embedding; a tied output reads it whole."""
        from gguf import GGUFReader

        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(self.spec["gguf"]).tensors}
        total = sum(tensors.values())
        if "output.weight" in tensors:  # untied: the embedding table is only looked up
            vocab = self.spec["vocab_size"]
            total -= tensors["token_embd.weight"] - tensors["token_embd.weight"] // vocab
        return total

    def run(self, prompts: List[List[int]], n: int) -> Run:
        if len(prompts) != 1:
            raise Unsupported("llama-cpp-python's generate() decodes one sequence at a time")
        self.llm.reset()  # no reuse of the previous run's cache (it would skip the prefill)
        out = []
        t0 = time.perf_counter()
        steps = self.llm.generate(prompts[0], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        for token in steps:  # never stops on its own (stop tokens are checked by create_completion)
            out.append(token)
            if len(out) == n:
                break
        steps.close()
        return Run(time.perf_counter() - t0, [out], len(out))


class MetaEngine:
    """Meta's reference model code (llama-models) on our Meta-format checkpoint, with the
    reference's generation loop: from the shortest prompt on, one position per step, prompt
    tokens forced where a row still has them."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.model = None

    def prepare(self, max_seq_len: int, max_batch_size: int) -> Optional[dict]:
        if self.model is not None:
            return None  # built once for the largest sizes: it reads only the used cache
        from llama_models.llama3.args import ModelArgs as MetaArgs
        from llama_models.llama3.model import Transformer as MetaTransformer

        from llama.distributed import setup_model_parallel

        setup_model_parallel(1, self.device)  # fairscale's layers need a (single-rank) group

        def load():
            ckpt_dir = Path(self.spec["ckpt_dir"])
            params = json.loads((ckpt_dir / "params.json").read_text())
            args = MetaArgs(**params, max_seq_len=self.spec["max_context"], max_batch_size=self.spec["max_batch"])
            model = MetaTransformer(args)
            state = torch.load(ckpt_dir / "consolidated.00.pth", map_location="cpu", mmap=True, weights_only=True)
            model.load_state_dict(state, strict=True)
            return model.to(self.device, getattr(torch, self.spec["dtype"])).eval()

        self.model, info = measure_load(self.device, load)
        return info

    def bytes_per_token(self) -> int:
        return bytes_read_per_token(self.model, [self.model.tok_embeddings])

    @torch.inference_mode()
    def run(self, prompts: List[List[int]], n: int) -> Run:
        lengths = [len(p) for p in prompts]
        min_len, total_len = min(lengths), max(lengths) + n
        tokens = torch.zeros((len(prompts), total_len), dtype=torch.long, device=self.device)
        is_prompt = torch.zeros_like(tokens, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt)
            is_prompt[row, : len(prompt)] = True
        self.sync()
        t0 = time.perf_counter()
        prev = 0
        for cur in range(min_len, total_len):
            logits = self.model.forward(tokens[:, prev:cur], prev)
            next_token = torch.argmax(logits[:, -1], dim=-1)
            tokens[:, cur] = torch.where(is_prompt[:, cur], tokens[:, cur], next_token)
            prev = cur
        self.sync()
        seconds = time.perf_counter() - t0
        rows = [tokens[row, length : length + n].tolist() for row, length in enumerate(lengths)]
        # Rows with shorter prompts get more than n tokens: total_len - their length.
        return Run(seconds, rows, sum(total_len - length for length in lengths))


def make_engine(spec: dict) -> Engine:
    return {"ours": OursEngine, "transformers": TransformersEngine, "llama.cpp": LlamaCppEngine,
            "meta": MetaEngine}[spec["kind"]](spec)
