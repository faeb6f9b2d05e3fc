"""Benchmarks: this library's configurations against transformers, llama.cpp and Meta's reference.

    python -m benchmarks.bench                             # everything: ~30 minutes on 2 CPU cores
    python -m benchmarks.bench --quick --configs eager     # smoke run: ~2 minutes on 2 idle cores

Workloads, all greedy with exactly N new tokens per row (stop tokens never end a run early):
    decode, batch 1   a short chat prompt, N new tokens (default 128)
    decode, batch 8   8 different chat prompts, N new tokens each
    prefill           one 1024-token prompt: time to first token and prefill tokens/s
    sweep             decode tokens/s at batch sizes 1, 2, 4, 8 (a PNG plot)

Timing uses whole calls of each engine's own generation: the time to first token (TTFT) is
that of a 1-token generation, the decode time that of an N-token generation minus the TTFT.

Each engine (one of our configurations, or a peer) runs in a fresh subprocess, one after
the other: memory figures are its own, and nothing it leaves behind (compiled graphs,
allocator caches, threads) touches the next. The parent measures the machine's memory
bandwidth, prepares the prompts' token ids once (every engine gets the same ids), and
writes the report: a markdown table on stdout, JSON, and the plot.

See benchmarks/README.md for what each column means.
"""

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Our configurations: the keyword arguments each adds to `Llama.build`.
# "a+b" combines them ("compiled+int8"); "name@bfloat16" overrides the dtype.
CONFIGS: Dict[str, dict] = {
    "eager": {},
    "compiled": {"compile": True},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "llm.int8": {"quantize": "llm.int8"},
}
PEERS = ("transformers", "llama.cpp", "meta")
DEFAULT_PEERS = ("transformers", "llama.cpp")  # Meta's reference (llama-models) is opt-in: --peers ...,meta
BASELINE = "transformers"  # the peer every ratio is taken against

# Eight different short chat prompts; the first is the batch-1 workload.
QUESTIONS = [
    "What is the capital of France? Tell me about its history.",
    "Explain how a rainbow forms, in simple words.",
    "Write a short poem about the sea.",
    "Give me three tips for learning to program.",
    "Why is the sky blue?",
    "Describe a healthy breakfast and why it is good for you.",
    "What are the main differences between cats and dogs as pets?",
    "Summarise the plot of a detective story you invent.",
]
# Filler for the long prefill prompt (repeated, then cut to the exact length).
PARAGRAPH = (
    "The history of computing is a story of ideas meeting materials. Mechanical calculators gave "
    "way to relays, relays to vacuum tubes, tubes to transistors, and transistors to integrated "
    "circuits holding billions of switches. Each step made machines smaller, faster and cheaper, "
    "and each step changed what people believed a computer was for. "
)


def log(message: str):
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _max_rss_bytes()


def _max_rss_bytes() -> int:
    """Peak RSS over the process's life (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMeter:
    """Peak memory of a stretch of work: on CUDA the allocator's peak, on the CPU the
    RSS high-water mark, which Linux lets a process reset (/proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "CUDA max allocated"
        else:
            self.kind = "peak RSS" if self._reset_rss_peak() else "peak RSS since process start"

    @staticmethod
    def _reset_rss_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset_rss_peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """RSS high-water mark since the last reset (VmHWM), else since process start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _max_rss_bytes()


def measure_load(device: torch.device, load: Callable[[], Any]) -> Tuple[Any, dict]:
    """Runs `load()`; returns its result and the load figures: seconds, RSS just before,
    the RSS high-water mark during it, RSS after (and CUDA's allocator peak on GPUs)."""
    meter = MemoryMeter(device)
    baseline = _rss_bytes()
    meter.reset()
    t0 = time.perf_counter()
    result = load()
    synchronizer(device)()
    info = {"load_s": time.perf_counter() - t0, "baseline_rss": baseline, "peak_rss": peak_rss_bytes(),
            "rss_after": _rss_bytes()}
    if device.type == "cuda":
        info["cuda_peak_allocated"] = meter.peak()
    return result, info


# --------------------------------------------------------------------------- machine


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_bandwidth(device: torch.device, runs: int = 15) -> dict:
    """The machine's streamed read bandwidth: what batch-1 decoding is bound by.

    On CPU the faster of two reads of a 256 MiB fp32 weight (far larger than any cache): an
    fp32 matrix-vector product `F.linear` (1xK @ KxN, what a decode step does) and a plain
    sum over the weight. The BLAS matrix-vector kernel alone can stream well below the
    memory's bandwidth (MKL on AMD CPUs), which would set the bound too low.
    On CUDA a device-to-device copy of 1 GiB (read + write bytes)."""
    sync = synchronizer(device)
    k = n = 8192
    weight = torch.full((n, k), 0.5, device=device)  # (N, K) fp32: 256 MiB
    x = torch.randn(1, k, device=device)

    def median_seconds(fn) -> float:
        times = []
        for i in range(3 + runs):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= 3:  # the first 3 are warm-up
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    result = {
        "method": f"fastest read of a {weight.nbytes / 2**20:.0f} MiB fp32 weight: fp32 F.linear 1x{k} @ {k}x{n}"
        f" or a sum over it, median of {runs}",
        "matvec_bytes_per_s": weight.nbytes / median_seconds(functools.partial(F.linear, x, weight)),
        "sum_bytes_per_s": weight.nbytes / median_seconds(weight.sum),
    }
    result["bytes_per_s"] = max(result["matvec_bytes_per_s"], result["sum_bytes_per_s"])
    del weight
    if device.type == "cuda":
        src = torch.empty(2**28, device=device)  # 1 GiB fp32
        dst = torch.empty_like(src)
        copy_times = []
        for i in range(3 + runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize(device)
            if i >= 3:
                copy_times.append(start.elapsed_time(end) / 1e3)
        result["copy_bytes_per_s"] = 2 * src.nbytes / statistics.median(copy_times)
        result["bytes_per_s"] = result["copy_bytes_per_s"]
        result["method"] = f"1 GiB device-to-device copy (read + write), median of {runs}"
        del src, dst
    return result


def machine_info(device: torch.device, threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for package in ("transformers", "llama_cpp", "llama_models"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "installed")
        except Exception:  # not installed, or broken: the peer reports why
            info[package] = None
    return info


# --------------------------------------------------------------------------- engines (run in a worker)


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


class OursEngine:
    """`Llama.build` with a configuration's keyword arguments; a fixed-length greedy decode."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.sync = synchronizer(self.device)
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


class TransformersEngine:
    """transformers' `generate` on the same GGUF, dequantized to the same dtype."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.sync = synchronizer(self.device)
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
        # Left-padded batch with an attention mask: transformers' way of batching prompts.
        length = max(map(len, prompts))
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
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


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on the GGUF as it is (Q4_1), one sequence at a time."""

    def __init__(self, spec: dict):
        self.spec = spec
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
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.sync = synchronizer(self.device)
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


def make_engine(spec: dict):
    return {"ours": OursEngine, "transformers": TransformersEngine, "llama.cpp": LlamaCppEngine,
            "meta": MetaEngine}[spec["kind"]](spec)


# --------------------------------------------------------------------------- timing (in a worker)


def measure(engine, prompts: List[List[int]], n: int, warmup: int, runs: int, meter: MemoryMeter,
            fixed_length: bool) -> dict:
    """Time to first token and decode speed, from whole calls of the engine's generation:
    TTFT is the time of a 1-token generation (prefill and the first token); the decode time
    is that of an n-token generation minus the TTFT, for the n - 1 tokens after the first.
    Warm-up runs first (untimed: compilation, allocator, caches), then `runs` timed runs of
    each length, interleaved so that both see the same noise; medians."""
    lengths = (1, n) if n > 1 else (1,)
    warmup_s = []
    for _ in range(warmup):
        for length in lengths:
            t0 = time.perf_counter()
            engine.run(prompts, length)
            warmup_s.append(time.perf_counter() - t0)
    meter.reset()
    timed = {length: [] for length in lengths}
    for _ in range(runs):
        for length in lengths:
            timed[length].append(engine.run(prompts, length))
    peak = meter.peak()
    for length in lengths:
        got = [len(row) for row in timed[length][-1].tokens]
        if fixed_length and any(g != length for g in got):
            raise RuntimeError(f"a fixed-length run of {length} tokens returned {got} tokens per row")
    first, full = timed[1], timed[n]
    ttft = statistics.median(r.seconds for r in first)
    total = statistics.median(r.seconds for r in full)
    record = {
        "batch": len(prompts),
        "prompt_lens": [len(p) for p in prompts],
        "new_tokens_per_row": [len(row) for row in full[-1].tokens],
        "tokens_generated": full[-1].generated,
        "ttft_runs_s": [r.seconds for r in first],
        "warmup_s": warmup_s,
        "ttft_s": ttft,
        "peak_mem": peak,
        "mem_kind": meter.kind,
        "first_row_tokens": full[-1].tokens[0],
    }
    if n > 1:
        decode_tokens = full[-1].generated - first[-1].generated
        record.update(
            total_runs_s=[r.seconds for r in full],
            total_s=total,
            decode_s=total - ttft,
            decode_tok_s=decode_tokens / (total - ttft) if total > ttft else None,
            e2e_tok_s=full[-1].generated / total,
        )
    return record


def profile_run(engine, prompts: List[List[int]], n: int, device: torch.device, title: str):
    """Prints torch.profiler's table for one decode run, most self time first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.run(prompts, n)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### profile: {title}, batch {len(prompts)}, {n} new tokens\n", flush=True)
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20), flush=True)


def worker_main(spec_path: str, out_path: str):
    """One engine in this fresh process: load, decode sweep, prefill; results as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    name = spec["name"]
    result = {"name": name, "kind": spec["kind"], "config": spec.get("config"), "status": "ok",
              "torch_threads": torch.get_num_threads(), "decode": {}}
    stage = "import"
    try:
        if spec["kind"] != "llama.cpp":
            # Imported before the load is measured: the baseline is an interpreter with torch and the engine.
            __import__({"ours": "llama.generation", "transformers": "transformers",
                        "meta": "llama_models.llama3.model"}[spec["kind"]])
        engine = make_engine(spec)
        meter = MemoryMeter(device)
        n = spec["new_tokens"]
        stage = "load"
        log(f"[{name}] loading ...")
        result["load"] = engine.prepare(spec["decode_context"], max(spec["batch_sizes"]))
        result["bytes_per_token"] = engine.bytes_per_token()
        for batch in spec["batch_sizes"]:
            stage = f"decode batch {batch}"
            prompts = spec["prompts"][:batch]
            try:
                record = measure(engine, prompts, n, spec["warmup"], spec["runs"], meter, spec["kind"] != "meta")
            except Unsupported as e:
                result["decode"][str(batch)] = {"unavailable": str(e)}
                log(f"[{name}] batch {batch}: unavailable: {e}")
                continue
            result["decode"][str(batch)] = record
            speed = f"{record['decode_tok_s']:.1f}" if record["decode_tok_s"] else "—"
            log(f"[{name}] batch {batch}: {speed} decode tok/s, TTFT {record['ttft_s'] * 1e3:.0f} ms "
                f"(warm-up {sum(record['warmup_s']):.1f} s)")
            if batch == 1 and spec["profile"] and spec["kind"] != "llama.cpp":
                profile_run(engine, prompts, n, device, name)
        if result["load"]:  # the weights are all resident by now (a lazy mmap may defer them past the load)
            result["load"]["rss_after_decode"] = _rss_bytes()
        if spec["prefill_len"] > 0:
            stage = "prefill"
            engine.prepare(spec["prefill_len"] + 1, 1)  # ours rebuilds: a cache sized for this prompt
            prompt = [spec["prefill_prompt"]]
            record = measure(engine, prompt, 1, spec["warmup"], spec["runs"], meter, spec["kind"] != "meta")
            record["prefill_tok_s"] = len(prompt[0]) / record["ttft_s"]
            result["prefill"] = record
            log(f"[{name}] prefill {len(prompt[0])} tokens: TTFT {record['ttft_s'] * 1e3:.0f} ms, "
                f"{record['prefill_tok_s']:.0f} tok/s")
    except Exception as e:  # a configuration or peer that cannot run is reported, not fatal
        traceback.print_exc()
        result["status"] = "unavailable"
        result["reason"] = f"{type(e).__name__} during {stage}: {e}".strip()
    Path(out_path).write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


def parse_configs(text: str) -> List[dict]:
    """'eager,compiled+int8,int4@bfloat16' -> [{"config", "build_kwargs", "dtype"}]."""
    configs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, dtype = item.partition("@")
        kwargs = {}
        for part in name.split("+"):
            if part not in CONFIGS:
                raise SystemExit(f"unknown configuration {part!r} in {item!r}; choose from {', '.join(CONFIGS)}")
            kwargs.update(CONFIGS[part])
        configs.append({"config": item, "build_kwargs": kwargs, "dtype": dtype or None})
    return configs


def build_prompts(tokenizer_path: Path, prefill_len: int) -> dict:
    """Token ids of the chat prompts and of the long prefill prompt, in the checkpoint's chat format."""
    from llama.chat_format import make_chat_format
    from llama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    formatter = make_chat_format(tokenizer)
    chats = [formatter.encode_dialog_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    long_prompt = []
    if prefill_len > 0:
        text = PARAGRAPH
        while True:
            long_prompt = formatter.encode_dialog_prompt([{"role": "user", "content": text}])
            if len(long_prompt) >= prefill_len:
                break
            text += PARAGRAPH
        long_prompt = long_prompt[:prefill_len]
    return {"chats": chats, "prefill": long_prompt, "vocab_size": tokenizer.n_words}


def run_worker(spec: dict, workdir: Path) -> dict:
    spec_path = workdir / f"spec-{spec['index']}.json"
    out_path = workdir / f"result-{spec['index']}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(out_path)],
                          env=env, cwd=REPO_ROOT)
    if out_path.is_file():
        return json.loads(out_path.read_text())
    return {"name": spec["name"], "kind": spec["kind"], "config": spec.get("config"), "status": "unavailable",
            "reason": f"worker exited with code {proc.returncode} before writing results", "decode": {}}


def default_dtype(device: torch.device) -> str:
    from llama.distributed import choose_dtype

    return str(choose_dtype(device)).removeprefix("torch.")


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32 new tokens, 3 timed runs, batch sizes 1 and 8, 512-token prefill")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"our configurations, comma-separated, from {', '.join(CONFIGS)}; "
                        "'a+b' combines, 'name@bfloat16' sets the dtype (default: all)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"peers, comma-separated, from {', '.join(PEERS)}, or 'none' "
                        f"(default: {','.join(DEFAULT_PEERS)})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="default: the library's (fp32 on CPU, bf16 on GPUs)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 128; quick 32)")
    parser.add_argument("--batch-sizes", default=None, help="decode sweep (default 1,2,4,8; quick 1,8)")
    parser.add_argument("--prefill-len", type=int, default=None, help="prefill prompt tokens (default 1024; quick 512; 0 skips)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs, median reported (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs before each workload (>= 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every engine (default: CPUs available)")
    parser.add_argument("--ckpt-dir", default=None, help="Meta-format checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf", default=None, help="GGUF file of the same weights for the peers (default: the bundled one)")
    parser.add_argument("--json", default=None, help="results file (default: benchmarks/results/<name>.json)")
    parser.add_argument("--name", default=None, help="stem of the default output files (default: a timestamp)")
    parser.add_argument("--plot", default=None, help="PNG of tokens/s vs batch size (default: beside the JSON)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one batch-1 decode run")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)

    new_tokens = args.new_tokens or (32 if args.quick else 128)
    runs = args.runs or (3 if args.quick else 5)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8" if args.quick else "1,2,4,8")).split(",")]
    prefill_len = args.prefill_len if args.prefill_len is not None else (512 if args.quick else 1024)
    if args.warmup < 1 or runs < 1 or new_tokens < 2:
        raise SystemExit("--warmup and --runs must be >= 1 and --new-tokens >= 2")
    if max(batch_sizes) > len(QUESTIONS):
        raise SystemExit(f"batch sizes up to {len(QUESTIONS)} (there are {len(QUESTIONS)} prompts)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or default_dtype(device)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    configs = parse_configs(args.configs)
    peers = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    for peer in peers:
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}; choose from {', '.join(PEERS)} or none")

    if args.ckpt_dir:
        ckpt_dir = Path(args.ckpt_dir)
        tokenizer_path = ckpt_dir / "tokenizer.model"
    else:
        from llama.default_model import ensure_default_model

        ckpt_dir, tokenizer_path = ensure_default_model()
    gguf, gguf_error = None, None
    if {"transformers", "llama.cpp"} & set(peers):
        try:
            if args.gguf:
                gguf = Path(args.gguf)
            else:
                from llama.default_model import default_gguf_path

                gguf = default_gguf_path()
        except Exception as e:
            gguf_error = f"no GGUF for the peers: {type(e).__name__}: {e}"
    prompts = build_prompts(tokenizer_path, prefill_len)
    chats = prompts["chats"][: max(batch_sizes)]

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else RESULTS_DIR / f"{args.name or stamp}.json"
    plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")

    log(f"measuring memory bandwidth on {device} ...")
    bandwidth = measure_bandwidth(device)
    info = machine_info(device, threads)
    log(f"streamed bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (matrix-vector"
        f" {bandwidth['matvec_bytes_per_s'] / 1e9:.1f} GB/s, sum {bandwidth['sum_bytes_per_s'] / 1e9:.1f} GB/s)")

    common = {
        "device": str(device), "threads": threads, "new_tokens": new_tokens, "batch_sizes": batch_sizes,
        "runs": runs, "warmup": args.warmup, "profile": args.profile, "prompts": chats,
        "prefill_prompt": prompts["prefill"], "prefill_len": prefill_len, "vocab_size": prompts["vocab_size"],
        "ckpt_dir": str(ckpt_dir), "tokenizer_path": str(tokenizer_path), "gguf": str(gguf) if gguf else None,
        "decode_context": max(map(len, chats)) + new_tokens,
        "max_context": max(max(map(len, chats)) + new_tokens, prefill_len + 1),
        "max_batch": max(batch_sizes),
    }
    specs = []
    for peer in [p for p in peers if p == BASELINE] + [p for p in peers if p != BASELINE]:
        name = {"transformers": "transformers", "llama.cpp": "llama.cpp (Q4_1)", "meta": "Meta reference"}[peer]
        specs.append({**common, "kind": peer, "name": name, "dtype": dtype})
    for config in configs:
        specs.append({**common, "kind": "ours", "name": f"llama {config['config']}", "config": config["config"],
                      "build_kwargs": config["build_kwargs"], "dtype": config["dtype"] or dtype})

    results = []
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as workdir:
        for index, spec in enumerate(specs):
            spec["index"] = index
            if spec["kind"] in ("transformers", "llama.cpp") and gguf is None:
                result = {"name": spec["name"], "kind": spec["kind"], "status": "unavailable", "reason": gguf_error,
                          "decode": {}}
            elif spec["kind"] == "llama.cpp" and info["llama_cpp"] is None:
                result = {"name": spec["name"], "kind": spec["kind"], "status": "unavailable", "decode": {},
                          "reason": "llama_cpp is not importable (pip install llama-cpp-python; builds llama.cpp)"}
            elif spec["kind"] == "meta" and info["llama_models"] is None:
                result = {"name": spec["name"], "kind": spec["kind"], "status": "unavailable", "decode": {},
                          "reason": "llama_models is not importable (pip install llama-models)"}
            else:
                result = run_worker(spec, Path(workdir))
            if result["status"] != "ok":
                log(f"[{spec['name']}] unavailable: {result['reason']}")
            result["dtype"] = spec["dtype"] if spec["kind"] != "llama.cpp" else "Q4_1 (GGUF as is)"
            results.append(result)

    settings = {k: common[k] for k in ("device", "threads", "new_tokens", "batch_sizes", "runs", "warmup",
                                       "prefill_len", "ckpt_dir", "gguf")}
    settings.update(dtype=dtype, quick=args.quick, prompt_lens=[len(p) for p in chats],
                    checkpoint_bytes=checkpoint_bytes(ckpt_dir),
                    gguf_bytes=gguf.stat().st_size if gguf and gguf.is_file() else None)
    report = {"created": stamp, "argv": sys.argv, "machine": info, "bandwidth": bandwidth, "settings": settings,
              "engines": results}
    markdown = render_markdown(report)
    print(markdown)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    json_path.with_suffix(".md").write_text(markdown + "\n")
    log(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    plot(report, plot_path)


def checkpoint_bytes(ckpt_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(ckpt_dir).glob("consolidated.*.pth"))


# --------------------------------------------------------------------------- report


def _table(headers: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(nbytes: Optional[float]) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:,.0f}"


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return f"{value / base:.2f}×" if value and base else "—"


def _agreement(tokens: Optional[List[int]], reference: Optional[List[int]]) -> str:
    """How many leading tokens equal the baseline's (greedy decoding of the same weights)."""
    if not tokens or not reference:
        return "—"
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return f"{same}/{len(reference)}"


def render_markdown(report: dict) -> str:
    settings, bandwidth, info = report["settings"], report["bandwidth"], report["machine"]
    engines = report["engines"]
    ok = [e for e in engines if e["status"] == "ok"]
    base = next((e for e in ok if e["kind"] == BASELINE), None)
    n = settings["new_tokens"]
    bw = bandwidth["bytes_per_s"]

    def decode(engine, batch):
        record = engine.get("decode", {}).get(str(batch))
        return record if record and "unavailable" not in record else None

    out = [
        f"Machine: {info.get('cpu')}"
        + (f", GPU {info['gpu']}" if info.get("gpu") else "")
        + f"; {settings['device']}, {settings['threads']} threads, torch {info['torch']}"
        + (f", transformers {info['transformers']}" if info.get("transformers") else "")
        + f". Streamed bandwidth {bw / 1e9:.1f} GB/s ({bandwidth['method']}).",
        f"Greedy, {n} new tokens per row (fixed: stop tokens do not end a run), "
        f"median of {settings['runs']} runs after {settings['warmup']} warm-up; default dtype {settings['dtype']}"
        + (" — quick run" if settings["quick"] else "") + ".",
        "",
    ]

    lens = settings["prompt_lens"]
    if 1 in settings["batch_sizes"]:
        out.append(f"### Decode, batch 1 (chat prompt of {lens[0]} tokens, {n} new tokens)\n")
        rows = []
        ref = decode(base, 1) if base else None
        for e in ok:
            r = decode(e, 1)
            if r is None:
                continue
            bound = bw / e["bytes_per_token"] if e.get("bytes_per_token") else None
            rows.append([
                e["name"], e["dtype"], str(r["tokens_generated"]), f"{r['ttft_s'] * 1e3:.0f}",
                _fmt(r["decode_tok_s"]), _ratio(r["decode_tok_s"], ref and ref["decode_tok_s"]),
                _mib(e.get("bytes_per_token")), _fmt(bound),
                f"{100 * r['decode_tok_s'] / bound:.0f}%" if bound and r["decode_tok_s"] else "—", _mib(r["peak_mem"]),
                _agreement(r.get("first_row_tokens"), ref and ref.get("first_row_tokens")),
            ])
        out.append(_table(["engine", "dtype", "tokens", "TTFT ms", "decode tok/s", "× transformers",
                           "MiB read/token", "bound tok/s", "% of bound", "peak mem MiB", "= transformers tokens"],
                          rows))
        out.append("")

    big = max(settings["batch_sizes"])
    if big > 1:
        out.append(f"### Decode, batch {big} ({big} different chat prompts of {min(lens)}–{max(lens)} tokens, "
                   f"{n} new tokens each)\n")
        rows = []
        ref = decode(base, big) if base else None
        for e in ok:
            r = decode(e, big)
            if r is None:
                continue
            rows.append([e["name"], e["dtype"], str(r["tokens_generated"]), f"{r['ttft_s'] * 1e3:.0f}",
                         _fmt(r["decode_tok_s"]), _ratio(r["decode_tok_s"], ref and ref["decode_tok_s"]),
                         _fmt(r["e2e_tok_s"]), _mib(r["peak_mem"])])
        out.append(_table(["engine", "dtype", "tokens", "TTFT ms", "decode tok/s", "× transformers",
                           "end-to-end tok/s", "peak mem MiB"], rows))
        out.append("")

    if settings["prefill_len"] > 0:
        out.append(f"### Prefill ({settings['prefill_len']}-token prompt, batch 1)\n")
        rows = []
        ref = base.get("prefill") if base else None
        for e in ok:
            r = e.get("prefill")
            if r is None:
                continue
            rows.append([e["name"], e["dtype"], f"{r['ttft_s'] * 1e3:.0f}", f"{r['prefill_tok_s']:.0f}",
                         _ratio(r["prefill_tok_s"], ref and ref["prefill_tok_s"]), _mib(r["peak_mem"])])
        out.append(_table(["engine", "dtype", "TTFT ms", "prefill tok/s", "× transformers", "peak mem MiB"], rows))
        out.append("")

    if len(settings["batch_sizes"]) > 1:
        out.append("### Decode tokens/s (all rows together) vs batch size\n")
        rows = []
        for e in ok:
            cells = []
            for b in settings["batch_sizes"]:
                r = decode(e, b)
                cells.append(_fmt(r["decode_tok_s"]) if r else "—")
            rows.append([e["name"]] + cells)
        out.append(_table(["engine"] + [f"batch {b}" for b in settings["batch_sizes"]], rows))
        out.append("")

    out.append("### Loading: peak RSS while building (fresh process)\n")
    rows = []
    for e in ok:
        load = e.get("load")
        if not load:
            continue
        on_disk = settings["gguf_bytes"] if e["kind"] in ("transformers", "llama.cpp") else settings["checkpoint_bytes"]
        growth = load["peak_rss"] - load["baseline_rss"]
        rows.append([e["name"], "GGUF" if e["kind"] in ("transformers", "llama.cpp") else "Meta .pth",
                     f"{load['load_s']:.1f}", _mib(load["baseline_rss"]), _mib(load["peak_rss"]), _mib(growth),
                     _mib(on_disk), f"{growth / on_disk:.2f}" if on_disk else "—", _mib(load.get("rss_after_decode"))])
    out.append(_table(["engine", "loads", "load s", "baseline RSS MiB", "peak RSS MiB", "peak − baseline MiB",
                       "on disk MiB", "(peak − baseline) / disk", "RSS after decoding MiB"], rows))
    out.append("")

    missing = [e for e in engines if e["status"] != "ok"]
    partial = [(e, b, r["unavailable"]) for e in ok for b, r in e.get("decode", {}).items() if "unavailable" in r]
    if missing or partial:
        out.append("### Not measured\n")
        out += [f"- {e['name']}: unavailable: {e['reason']}" for e in missing]
        out += [f"- {e['name']}, batch {b}: unavailable: {reason}" for e, b, reason in partial]
        out.append("")
    return "\n".join(out)


def plot(report: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not importable: skipping the plot (pip install matplotlib)")
        return
    settings = report["settings"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in report["engines"]:
        points = [(b, e["decode"][str(b)]["decode_tok_s"]) for b in settings["batch_sizes"]
                  if e.get("decode", {}).get(str(b), {}).get("decode_tok_s")]
        if points:
            ax.plot(*zip(*points), marker="o", label=e["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(settings["batch_sizes"], [str(b) for b in settings["batch_sizes"]])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_title(f"Decode throughput, {settings['new_tokens']} new tokens, {settings['device']}, "
                 f"{settings['threads']} threads")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
