"""The report: markdown tables of every workload (ratios against the baseline peer) and a
plot of decode tokens/s against batch size."""

from pathlib import Path
from typing import List, Optional

from bench import log

BASELINE = "transformers"  # the peer every ratio is taken against


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
    around = [e["bandwidth_bytes_per_s"] for e in ok if e.get("bandwidth_bytes_per_s")]  # older reports: none

    def decode(engine, batch):
        record = engine.get("decode", {}).get(str(batch))
        return record if record and "unavailable" not in record else None

    out = [
        f"Machine: {info.get('cpu')}"
        + (f", GPU {info['gpu']}" if info.get("gpu") else "")
        + f"; {settings['device']}, {settings['threads']} threads, torch {info['torch']}"
        + (f", transformers {info['transformers']}" if info.get("transformers") else "")
        + f". Streamed bandwidth {bw / 1e9:.1f} GB/s at the start ({bandwidth['method']})"
        + (f"; {min(around) / 1e9:.1f}–{max(around) / 1e9:.1f} GB/s around the engines' runs (each engine's "
           "bound: the mean of the bandwidth just before and just after it)" if around else "")
        + ".",
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
            bound = e.get("bandwidth_bytes_per_s", bw) / e["bytes_per_token"] if e.get("bytes_per_token") else None
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
