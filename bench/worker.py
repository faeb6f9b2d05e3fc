"""One engine per fresh process: the parent writes a spec (JSON) and runs this module on
it in a subprocess; the worker loads the engine, times the workloads and writes its
results (JSON).

    python -m bench.worker SPEC OUT
"""

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import List

import torch

from bench import log
from bench.engines import Unsupported, make_engine
from bench.meters import MemoryMeter, rss_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent


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
            result["load"]["rss_after_decode"] = rss_bytes()
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


# --------------------------------------------------------------------------- in the parent


def run_worker(spec: dict, workdir: Path) -> dict:
    """Runs `spec` in a fresh `python -m bench.worker`; returns its results, or why there are none."""
    spec_path = workdir / f"spec-{spec['index']}.json"
    out_path = workdir / f"result-{spec['index']}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench.worker", str(spec_path), str(out_path)], env=env,
                          cwd=REPO_ROOT)
    if out_path.is_file():
        return json.loads(out_path.read_text())
    return {"name": spec["name"], "kind": spec["kind"], "config": spec.get("config"), "status": "unavailable",
            "reason": f"worker exited with code {proc.returncode} before writing results", "decode": {}}


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
