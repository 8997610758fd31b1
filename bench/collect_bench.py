"""Collection throughput: plain forward vs `collect` vs the paper's per-token loop, one process.

(a) plain forward: the engine's own batching and data loading, no statistics;
(b) `collect` with all statistics (topk, positive, moments): its streaming loop (data loading,
    forward, statistics); the one-time store cost (allocation, final Zarr write) is printed apart;
(b') the same with the topk statistic only, the one the paper's loop computes;
(c) the paper's loop: batch 1, activations captured by hooks, then per token and layer
    `torch.topk`, a host sync and `record[row, idx] += 1`; its statistics part is (c) minus a
    plain batch-1 forward.
Prints frames/s and the ratios, and appends the table to bench/RESULTS.md.

    python bench/collect_bench.py --tokens phone-mid            # CPU, HuBERT-base geometry, fp32
    python bench/collect_bench.py --device cuda --dtype bfloat16 --speakers 8 --utterances 8
    python bench/collect_bench.py --smoke                       # tiny model, a few utterances (CI)
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from benchutil import build_corpus, corpus_arguments, emit, machine, once, paper_loop, parse, sync  # noqa: E402

from neurostat.engine.batching import BatchDataset, plan_batches  # noqa: E402
from neurostat.engine.collect import CollectConfig, collect  # noqa: E402
from neurostat.engine.device import default_batch_seconds  # noqa: E402
from neurostat.labelspace import LabelSpace  # noqa: E402
from neurostat.model.loading import load_adapter  # noqa: E402


def plain_forward(corpus, adapter, config) -> float:
    """Seconds of the engine's batching, data loading and forward, without statistics."""
    batches = plan_batches(corpus, list(range(len(corpus))), config.batch_seconds, None)
    data = BatchDataset(corpus, batches, adapter.feature_extractor, config.tokens, LabelSpace.of_corpus(corpus))
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=config.num_jobs)

    def run():
        for item in loader:
            adapter.encode(item["waves"], item["lengths"])

    return once(run, adapter.device)


def main() -> None:
    args = parse(corpus_arguments(__doc__, backend="torch"))
    args.batch_seconds = args.batch_seconds or default_batch_seconds(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, model_dir = build_corpus(work, args.speakers, args.utterances, args.layers, args.size, args.corpus_dir)
        adapter = load_adapter(str(model_dir), device=args.device, dtype=getattr(torch, args.dtype))
        config = CollectConfig(
            tokens=args.tokens,
            batch_seconds=args.batch_seconds,
            num_jobs=args.num_jobs,
            backend=args.backend,
            checkpoint_seconds=1e9,
        )
        frames = sum(u.num_frames for u in corpus)
        audio = sum(u.record["num_samples"] for u in corpus) / corpus.geometry.sample_rate
        plain_forward(corpus, adapter, config)  # warm-up
        runs = {"plain": [], "all": [], "all_total": [], "topk": []}
        for r in range(args.repeat):
            runs["plain"].append(plain_forward(corpus, adapter, config))
            for name, stats in (("all", CollectConfig.stats), ("topk", ("topk",))):
                sync(args.device)
                start = time.perf_counter()
                cfg = CollectConfig(**{**config.__dict__, "stats": stats})
                meta = collect(corpus, adapter, work / f"{name}{r}.zarr", cfg, progress=False)
                sync(args.device)
                runs[name].append(meta.progress.loop_seconds)
                if name == "all":
                    runs["all_total"].append(time.perf_counter() - start)
        a, b, b_topk = min(runs["plain"]), min(runs["all"]), min(runs["topk"])
        fixed = min(t - loop for t, loop in zip(runs["all_total"], runs["all"]))
        tokens = meta.progress.tokens
        rows = [
            ("(a) plain forward", a),
            ("(b) collect, all statistics (streaming loop)", b),
            ("(b') collect, topk only (streaming loop)", b_topk),
        ]
        if not args.no_paper:
            k = meta.k
            c, c_forward = paper_loop(corpus, adapter, args.tokens, k)
            rows.append(("(c) paper's per-token loop (topk only, batch 1)", c))
        lines = [
            f"### collect_bench: tokens {args.tokens}, {args.dtype}, {args.device}, backend {args.backend}",
            "",
            f"- machine: {machine(args.device)}",
            f"- model: random HuBERT-{'tiny' if args.smoke else 'base'} geometry, {adapter.num_layers} layers x "
            f"{adapter.width} neurons; "
            f"corpus: {len(corpus)} synthetic utterances, {audio:.1f} s, {frames} frames, {tokens} tokens; "
            f"batches of {args.batch_seconds:g} s; -j {args.num_jobs}; best of {args.repeat}",
            "",
            "| run | seconds | frames/s | vs (a) |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [f"| {name} | {t:.3f} | {frames / t:,.0f} | {t / a:.3f} |" for name, t in rows]
        lines += [
            "",
            f"- (b)/(a) = {b / a:.3f}; statistics part of (b) = {b - a:.3f} s, of (b') = {b_topk - a:.3f} s",
            f"- one-time store cost of (b) (allocation, final compute and Zarr write, not per frame): {fixed:.3f} s",
        ]
        if not args.no_paper:
            theirs = c - c_forward
            ratio = lambda ours: f"{theirs / ours:.1f}x" if ours > 0.02 * a else "n/a (ours is within timing noise)"  # noqa: E731
            lines.append(
                f"- statistics part of (c): {theirs:.3f} s (its batch-1 forwards: {c_forward:.3f} s); "
                f"(c)/(b') on the topk statistic = {ratio(b_topk - a)}, (c)/(b) with all statistics = {ratio(b - a)}"
            )
        emit("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
