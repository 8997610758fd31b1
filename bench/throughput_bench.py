"""Throughput of the forward and of collect, in one process, and what bounds a whole-corpus run.

(i)   the forward a user writes by hand: the HF feature extractor pads the batch and returns an
      attention mask, the model runs once (not exact for group-norm models: padding changes them);
(ii)  the engine's forward with the per-utterance front end (exact; the previous design);
(iii) the engine's forward with the batched front end (exact: per-utterance group-norm statistics);
(iii-g) the engine's forward with the gemm front end (exact: channels-last GEMMs, tensor cores on a GPU);
(iv)  `collect` with all statistics on the engine's default front end for the device: its streaming
      loop, data loading included;
(v)   the paper's per-token loop (batch 1, `torch.topk` per token and layer, a host sync each);
with --family whisper (a random encoder of Whisper-base's sizes, a tiny one with --smoke; 30 s windows)
the forwards are (i) the feature extractor's log-mel of each batch's windows, then the encoder, by hand,
and (iii) the engine's forward (the same, through the adapter); (ii) and (iii-g) are the wav2vec2 family's;
and the loader alone (FLAC decoding, normalisation, frame labels, tokens) with -j workers.  First, printed at
once: the loader in this process against a plain soundfile decode of the same files, batch by batch (its
cost beyond decoding; the audio-s/s of one worker) — alone with --loader-only.
(i)-(iii-g) run on the same padded batches, decoded beforehand, best of --repeat.  Prints audio-seconds
per second and frames/s, and projects the wall time of dev-clean (5.4 h) and of 960 h from the
measured rates (the slower of the compute and the loader bounds the run).

    python bench/throughput_bench.py --tokens phone-mid        # CPU, HuBERT-base geometry, fp32
    python bench/throughput_bench.py --device cuda --dtype bfloat16 --speakers 16 --utterances 8 -j 8
    python bench/throughput_bench.py --smoke                    # tiny model, a few utterances (CI)
    python bench/throughput_bench.py --family whisper           # a random Whisper-base encoder, 30 s windows
    python bench/throughput_bench.py --loader-only --speakers 6 --utterances 8 --repeat 5
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from benchutil import (  # noqa: E402
    build_corpus,
    corpus_arguments,
    emit,
    host_syncs,
    is_cuda,
    loader_alone,
    loader_vs_decode,
    machine,
    once,
    paper_loop,
    parse,
)
from transformers import AutoFeatureExtractor  # noqa: E402

from neurostat.engine.batching import BatchDataset, padding_fraction, plan_batches  # noqa: E402
from neurostat.engine.collect import CollectConfig, collect  # noqa: E402
from neurostat.engine.device import default_batch_seconds  # noqa: E402
from neurostat.engine.tokens import MODES  # noqa: E402
from neurostat.labelspace import LabelSpace  # noqa: E402
from neurostat.model.loading import load_adapter  # noqa: E402

HOURS = {"dev-clean (5.4 h)": 5.4, "960 h": 960.0}
BY_HAND, PER_UTTERANCE = (
    "(i) forward by hand (HF padding + attention mask)",
    "(ii) engine forward, per-utterance front end",
)
GEMM = "(iii-g) engine forward, gemm front end"


def decoded_batches(corpus, adapter, batch_seconds: float, tokens: str) -> tuple[list[dict], float]:
    """The planned batches, decoded and normalised once (the loader's items), and their padding."""
    batches = plan_batches(corpus, list(range(len(corpus))), batch_seconds, None)
    data = BatchDataset(corpus, batches, adapter.feature_extractor, tokens, LabelSpace.of_corpus(corpus))
    return [data[i] for i in range(len(data))], padding_fraction(corpus, batches)


def by_hand(adapter, corpus, items) -> callable:
    """(i): the feature extractor pads raw waveforms and gives the attention mask; one model call."""
    fe, model = adapter.feature_extractor, adapter.model
    raw = {u.id: u.load_audio() for u in corpus}
    inputs = [
        fe([raw[i] for i in item["ids"]], sampling_rate=fe.sampling_rate, padding=True, return_tensors="pt")
        for item in items
    ]

    @torch.inference_mode()
    def run():
        for x in inputs:
            model(
                x["input_values"].to(adapter.device, adapter.dtype),
                attention_mask=x["attention_mask"].to(adapter.device),
            )

    return run


def whisper_by_hand(adapter, items) -> callable:
    """(i) for Whisper: the feature extractor's log-mel of each batch's windows, then the encoder."""
    fe, encoder = adapter.feature_extractor, adapter.backbone.encoder
    windows = [[item["waves"][b, :n].numpy() for b, n in enumerate(item["lengths"].tolist())] for item in items]

    @torch.inference_mode()
    def run():
        for batch in windows:
            features = fe(batch, sampling_rate=fe.sampling_rate, return_tensors="pt").input_features
            encoder(features.to(adapter.device, adapter.dtype))

    return run


def forwards(args, adapter, corpus, items) -> dict[str, callable]:
    """The timed forwards of the family: name → a run over every batch; the engine's plain forward on the
    default front end is the one whose name starts with (iii)."""

    def engine(front_end: str | None):
        def run():
            for item in items:
                adapter.encode(item["waves"], item["lengths"], front_end=front_end)

        return run

    if args.family == "whisper":
        front_end = adapter.resolve_front_end("auto")
        return {
            "(i) forward by hand (log-mel by the feature extractor, the encoder)": whisper_by_hand(adapter, items),
            f"(iii) engine forward, {front_end} front end": engine(None),  # a batch's windows at once
        }
    return {
        BY_HAND: by_hand(adapter, corpus, items),
        PER_UTTERANCE: engine("per-utterance"),
        "(iii) engine forward, batched front end": engine("batched"),
        GEMM: engine("gemm"),
    }


def best_collect(corpus, adapter, folder: Path, config: CollectConfig, repeat: int):
    """The metadata of the fastest of ``repeat`` collect runs (by their loop's seconds)."""
    runs = [collect(corpus, adapter, folder / f"run{r}.zarr", config, progress=False) for r in range(repeat)]
    return min(runs, key=lambda m: m.progress.loop_seconds)


def loader_section(args, corpus, model_dir: Path, batch_seconds: float) -> str:
    """The loader against a plain soundfile decode of the same files, in this process (one worker's work)."""
    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    r = loader_vs_decode(corpus, fe, batch_seconds, args.tokens, max(args.repeat, 3))
    audio = sum(u.record["num_samples"] for u in corpus) / corpus.geometry.sample_rate
    return "\n".join(
        [
            f"### throughput_bench, the loader in one process: tokens {args.tokens}, {batch_seconds:g} s batches",
            "",
            f"- machine: {machine('cpu')}",
            f"- corpus: {len(corpus)} synthetic utterances, {audio:.1f} s, in {r['batches']} batches; "
            f"batch by batch in turns with a plain `soundfile.read` of the same files, {max(args.repeat, 3)} repeats",
            "",
            "| loader / plain decode (median over batches) | (totals) | beyond decoding | loader audio-s/s | "
            "decode audio-s/s |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {r['median']:.3f} | {r['total']:.3f} | {100 * (r['median'] - 1):.0f} % | {r['loader']:,.0f} | "
            f"{r['decode']:,.0f} |",
        ]
    )


def main() -> None:
    ap = corpus_arguments(__doc__, backend="auto")
    ap.add_argument("--loader-only", action="store_true", help="only the loader against a plain decode")
    ap.add_argument(
        "--family",
        choices=("hubert", "whisper"),
        default="hubert",
        help="the random model: HuBERT, or a Whisper encoder (30 s windows) [default: hubert]",
    )
    ap.add_argument(
        "--also-tokens",
        choices=MODES,
        default=None,
        help="also run (iv) with these tokens (one corpus and one set of forwards for both modes)",
    )
    args = parse(ap)
    batch_seconds = args.batch_seconds or default_batch_seconds(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, model_dir = build_corpus(
            work, args.speakers, args.utterances, args.layers, args.size, args.corpus_dir, args.family
        )
        emit(loader_section(args, corpus, model_dir, batch_seconds) + "\n", args.results)
        if args.loader_only:
            return
        adapter = load_adapter(str(model_dir), device=args.device, dtype=getattr(torch, args.dtype))
        items, padding = decoded_batches(corpus, adapter, batch_seconds, args.tokens)
        frames = sum(u.num_frames for u in corpus)
        audio = sum(u.record["num_samples"] for u in corpus) / corpus.geometry.sample_rate

        runs = forwards(args, adapter, corpus, items)
        times = {}
        for name, run in runs.items():
            run()  # warm-up
            times[name] = min(once(run, adapter.device) for _ in range(args.repeat))
        plain = times[next(name for name in runs if name.startswith("(iii)"))]

        def table(title: str, rows: dict[str, float]) -> list[str]:
            head = [f"### throughput_bench, {title}: tokens {args.tokens}, {args.dtype}, {args.device}", ""]
            head += [
                f"- machine: {machine(args.device)}",
                f"- model: random {'Whisper' if args.family == 'whisper' else 'HuBERT'}-{args.size} geometry, "
                f"{adapter.num_layers} layers x "
                f"{adapter.width} neurons, {adapter.attention} attention; corpus: {len(corpus)} synthetic utterances, "
                f"{audio:.1f} s, {frames} frames; {len(items)} batches of <= {batch_seconds:g} s padded audio "
                f"({100 * padding:.1f}% padding); -j {args.num_jobs}; best of {args.repeat}",
                "",
                "| run | seconds | audio-s/s | frames/s | vs (iii) |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            return head + [
                f"| {name} | {t:.3f} | {audio / t:,.1f} | {frames / t:,.0f} | {t / plain:.3f} |"
                for name, t in rows.items()
            ]

        by_hand_time = next(iter(times.values()))  # (i), the first run
        ratios = "; ".join(f"{name.split()[0]}/(i) = {t / by_hand_time:.3f}" for name, t in list(times.items())[1:])
        if GEMM in times:
            ratios += f"; (iii-g)/(ii) = {times[GEMM] / times[PER_UTTERANCE]:.3f} (the gemm front end vs the reference)"
        emit("\n".join([*table("forwards", times), "", f"- {ratios}"]) + "\n", args.results)
        emit("\n".join(collect_section(args, corpus, adapter, work, runs, times, table, audio)) + "\n", args.results)


def collect_section(args, corpus, adapter, work: Path, runs, times, table, audio: float) -> list[str]:
    """(iv) collect (and with --also-tokens (iv')), (v) the paper's loop and the loader: their table, the
    ratios and the projections."""
    batch_seconds = args.batch_seconds or default_batch_seconds(args.device)
    front_end = adapter.resolve_front_end("auto")
    config = CollectConfig(
        tokens=args.tokens, batch_seconds=batch_seconds, num_jobs=args.num_jobs, backend=args.backend,
        checkpoint_seconds=1e9,
    )  # fmt: skip
    iv = f"(iv) collect, all statistics, {front_end} front end (streaming loop, loading included)"
    meta = best_collect(corpus, adapter, work / "main", config, args.repeat)
    p = meta.progress
    rows = {iv: p.loop_seconds}
    if args.also_tokens:
        other = best_collect(corpus, adapter, work / "also", replace(config, tokens=args.also_tokens), args.repeat)
        rows[f"(iv') the same, tokens {args.also_tokens}"] = other.progress.loop_seconds
    if not args.no_paper:
        rows["(v) paper's per-token loop (top-k only, batch 1)"] = paper_loop(corpus, adapter, args.tokens, meta.k)[0]
    syncs, sites = host_syncs(
        lambda: collect(corpus, adapter, work / "syncs.zarr", config, progress=False), args.device
    )
    load = loader_alone(corpus, adapter.feature_extractor, batch_seconds, args.tokens, args.num_jobs)
    rows[f"loader alone, -j {args.num_jobs} (decode, normalise, label)"] = load
    own = times[next(name for name in runs if name.endswith(f"{front_end} front end"))]
    chosen = meta.statistics.get("label_stats")
    design = f", {chosen['design']} label_stats: {chosen['chosen']}" if chosen else ""
    lines = table(f"collect (backend {meta.statistics['backend']}{design})", rows)
    lines += [
        "",
        f"- (iv) / its plain forward ({front_end}) = {rows[iv] / own:.3f}; data wait in (iv): "
        f"{100 * p.data_wait_seconds / p.loop_seconds:.0f}% of its loop; loader per worker: "
        f"{audio / load / max(args.num_jobs, 1):,.1f} audio-s/s",
    ]
    if is_cuda(args.device):
        batches = len(plan_batches(corpus, list(range(len(corpus))), batch_seconds, None))
        where = ", ".join(f"{site} x{n}" for site, n in sites) or "none"
        lines.append(f"- host waits for the device in one (iv) pass: {syncs} over {batches} batches; where: {where}")
    for corpus_name, hours in HOURS.items():
        compute, loading = hours * 3600 * rows[iv] / audio, hours * 3600 * load / audio
        bound = "the compute" if compute >= loading else "the loader"
        lines.append(
            f"- projected {corpus_name}: collect {compute / 60:,.1f} min, the loader alone {loading / 60:,.1f} min "
            f"with -j {args.num_jobs}: bound by {bound}"
        )
    return lines


if __name__ == "__main__":
    main()
