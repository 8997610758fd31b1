"""The ``neurostat`` command line: a click group of subcommands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__


def cache_dir() -> Path:
    """Where the embedded default keeps its demo corpus and model (``$NEUROSTAT_CACHE``)."""
    return Path(os.environ.get("NEUROSTAT_CACHE", Path.home() / ".cache" / "neurostat"))


def _geometry(model: str | None, sample_rate: int | None):
    from .frames import default_geometry

    if model is None:
        geo = default_geometry()
    else:
        from .engine.adapter import ModelError, load_geometry

        try:
            geo = load_geometry(model)
        except ModelError as e:
            raise click.ClickException(str(e)) from None
    if sample_rate is not None and sample_rate != geo.sample_rate:
        from .frames import FrameGeometry

        geo = FrameGeometry(sample_rate, geo.conv_kernel, geo.conv_stride)
    return geo


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="neurostat")
def main() -> None:
    """Find, edit and prune the property neurons of speech Transformers (HuBERT, wav2vec 2.0, WavLM, data2vec).

    Typical flow: `synth` or a real LibriSpeech + MFA alignments → `prepare` → `collect` → `select`.
    `neurostat collect` with no arguments runs the whole embedded demo offline.
    """


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--speakers", "num_speakers", default=4, help="Number of speakers (alternating male/female voices).")
@click.option("--utterances", "utterances_per_speaker", default=4, help="Utterances per speaker.")
@click.option("--subset", default="dev-clean", help="Subset folder name in the LibriSpeech layout.")
@click.option("--seed", default=0, help="Seed for voices, pitch and sentences: same seed, same corpus.")
def synth(out: Path, num_speakers: int, utterances_per_speaker: int, subset: str, seed: int) -> None:
    """Write the offline demo corpus to OUT: espeak-ng speech in the LibriSpeech layout with exact TextGrids.

    Produces OUT/LibriSpeech/<subset>/..., OUT/LibriSpeech/SPEAKERS.TXT and OUT/alignments/<subset>/...
    """
    from .corpus.synth import synthesize

    root, align = synthesize(out, subset, num_speakers, utterances_per_speaker, seed)
    click.echo(
        f"corpus: {root}\nalignments: {align}\n"
        f"next: neurostat prepare --root {root} --subset {subset} --alignments {align} --out {out / 'prepared'}"
    )


def _labelling_options(f):
    """Options shared by `prepare` and `collect` (which prepares its corpus itself)."""
    options = [
        click.option("--corpus", type=click.Choice(["librispeech"]), default="librispeech", help="Corpus layout."),
        click.option("--subset", default=None, help="Subset folder, e.g. dev-clean."),
        click.option(
            "--alignments",
            type=click.Path(path_type=Path),
            default=None,
            help="Folder of MFA TextGrids (corpus layout or flat).",
        ),
        click.option(
            "--pitch",
            type=click.Choice(["praat", "yaapt"]),
            default="praat",
            help="F0 tracker (yaapt needs neurostat[paper]).",
        ),
        click.option("--pitch-bins", default=3, help="Number of voiced pitch bins at equal corpus percentiles."),
        click.option(
            "--pitch-edges",
            default=None,
            help="Comma-separated bin edges in Hz instead of percentiles (e.g. 129.03,179.78).",
        ),
        click.option(
            "--phone-map",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="JSON or TSV mapping of corpus phone symbols to ARPAbet/sil/spn (e.g. for MFA's IPA phone set).",
        ),
        click.option(
            "--strict", is_flag=True, help="Refuse (error) instead of resampling or skipping problem utterances."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run_prepare(
    root, subset, alignments, out, geometry, pitch, pitch_bins, pitch_edges, phone_map, strict, num_jobs
) -> Path:
    from .corpus.librispeech import CorpusError
    from .corpus.prepare import PrepareError, PrepareSettings, prepare as run_prepare
    from .labels.speakers import SpeakersError
    from .phones import PhoneMap

    for name, value in (("--root", root), ("--subset", subset), ("--alignments", alignments)):
        if value is None:
            raise click.UsageError(f"{name} is required to label a corpus")
    if pitch_bins < 1:
        raise click.BadParameter("need at least one pitch bin", param_hint="--pitch-bins")
    edges = None
    if pitch_edges:
        try:
            edges = tuple(float(x) for x in pitch_edges.split(","))
        except ValueError:
            raise click.BadParameter(
                f"{pitch_edges!r} is not a comma-separated list of numbers", param_hint="--pitch-edges"
            ) from None
    out = out or Path(alignments).parent / f"prepared-{subset}"
    try:
        settings = PrepareSettings(
            geometry=geometry,
            pitch=pitch,
            quantiles=tuple(i / pitch_bins for i in range(1, pitch_bins)),
            edges=edges,
            phone_map=PhoneMap.from_file(phone_map) if phone_map else PhoneMap(),
            strict=strict,
        )
        meta = run_prepare(root, subset, alignments, out, settings, num_jobs=num_jobs)
    except (CorpusError, PrepareError, SpeakersError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    _print_prepare_summary(meta, out)
    return out


@main.command()
@click.option(
    "--root",
    required=True,
    type=click.Path(path_type=Path),
    help="LibriSpeech root (the LibriSpeech folder or its parent).",
)
@_labelling_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Prepared-corpus folder [default: <alignments>/../prepared-<subset>].",
)
@click.option(
    "--model",
    default=None,
    help="Hub id or local dir whose config gives the frame geometry [default: the HuBERT/wav2vec2 default geometry].",
)
@click.option("--sample-rate", type=int, default=None, help="Override the model's sample rate.")
@click.option("-j", "--num-jobs", default=1, help="Parallel worker processes.")
def prepare(
    root,
    corpus,
    subset,
    alignments,
    pitch,
    pitch_bins,
    pitch_edges,
    phone_map,
    strict,
    out,
    model,
    sample_rate,
    num_jobs,
) -> None:
    """Label a corpus: phones per frame (MFA TextGrids), speaker gender (SPEAKERS.TXT), F0 and pitch bins.

    Cached: a second run reuses every utterance whose inputs and settings did not change.
    """
    _run_prepare(
        root,
        subset,
        alignments,
        out,
        _geometry(model, sample_rate),
        pitch,
        pitch_bins,
        pitch_edges,
        phone_map,
        strict,
        num_jobs,
    )


def _print_prepare_summary(meta: dict, out: Path) -> None:
    click.echo(
        f"prepared {meta['num_utterances']} utterances, {meta['hours']:.3f} h, {meta['num_frames']} frames -> {out}"
    )
    from .frames import FrameGeometry

    click.echo(
        f"frame geometry: {FrameGeometry.from_dict(meta['geometry']).describe()}; "
        f"pitch ({meta['pitch']['method']}) bin edges: {', '.join(f'{e:.2f} Hz' for e in meta['pitch']['edges'])}"
    )
    if meta["resampled"]:
        click.echo(f"resampled to {meta['geometry']['sample_rate']} Hz: {meta['resampled']} utterance(s)")
    if meta["skips"]:
        click.echo(
            "skipped: "
            + ", ".join(f"{reason} {n}" for reason, n in sorted(meta["skips"].items()))
            + f" (details: {out / 'skips.jsonl'})"
        )


@main.group()
def labels() -> None:
    """Label sets attached to a prepared corpus: extra label parts (k-means units, utterance clusters, ...).

    `collect` counts on every attached set by default (see its --labels) and `select --property NAME`
    groups by one.  File format: one utterance a line, `<id> <label> ...` (one label per model frame)
    or `<id> <label>` (one per utterance).
    """


def _open_prepared(path: Path):
    from .corpus.prepared import PreparedCorpus, PreparedCorpusError

    try:
        return PreparedCorpus(path)
    except PreparedCorpusError as e:
        raise click.ClickException(str(e)) from None


def _print_label_set(name: str, entry: dict) -> None:
    vocab = entry["vocab"]
    shown = ", ".join(vocab[:10]) + (", ..." if len(vocab) > 10 else "")
    click.echo(
        f"{name}: {entry['level']} level, {len(vocab)} labels ({shown}); {entry['utterances']} utterances"
        + (f", {entry['missing']} without labels (skipped by collect)" if entry["missing"] else "")
        + f"; from {entry['source']}"
    )


@labels.command("add")
@click.argument("prepared", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--level",
    type=click.Choice(["frame", "utterance"]),
    default="frame",
    help="One label per model frame of the prepared geometry, or one per utterance.",
)
@click.option("--allow-missing", is_flag=True, help="Let utterances without labels be skipped by collect.")
def labels_add(prepared, name, file, level, allow_missing) -> None:
    """Attach the labels in FILE to the prepared corpus PREPARED as label set NAME (replacing one of that name)."""
    from .labels.sets import LabelSetError, attach_label_set, check_name, read_label_file

    corpus = _open_prepared(prepared)
    try:
        check_name(name)
        entry = attach_label_set(corpus, name, read_label_file(file, level), level, str(file), allow_missing)
    except LabelSetError as e:
        raise click.ClickException(str(e)) from None
    _print_label_set(name, entry)
    if entry["unused"]:
        click.echo(
            f"{entry['unused']} utterances of {file} are not in {prepared} (skipped in prepare or another subset)"
        )


@labels.command("list")
@click.argument("prepared", type=click.Path(exists=True, file_okay=False, path_type=Path))
def labels_list(prepared) -> None:
    """List the label sets attached to PREPARED."""
    corpus = _open_prepared(prepared)
    if not corpus.label_sets:
        click.echo(f"{prepared}: no label sets (parts: {', '.join(corpus.label_space.parts)})")
    for name, entry in corpus.label_sets.items():
        _print_label_set(name, entry)


@labels.command("remove")
@click.argument("prepared", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("name")
def labels_remove(prepared, name) -> None:
    """Detach label set NAME from PREPARED and delete its file."""
    from .labels.sets import LabelSetError, remove_label_set

    try:
        remove_label_set(_open_prepared(prepared), name)
    except LabelSetError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"removed label set {name} from {prepared}")


@main.command()
@click.argument("prepared", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Name of the label set to attach (e.g. unit, spk_cluster).")
@click.option("--clusters", required=True, type=int, help="Number of k-means clusters.")
@click.option(
    "--level",
    type=click.Choice(["frame", "utterance"]),
    default="frame",
    help="Cluster frames (units) or utterances (mean layer output, or --vectors).",
)
@click.option("--model", default=None, help="Hub id or local directory whose layer output is clustered.")
@click.option("--layer", type=int, default=None, help="Transformer layer (1-based) whose output is clustered.")
@click.option(
    "--vectors",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Cluster these utterance vectors instead (e.g. i-vectors): `<id> v1 v2 ...` lines.",
)
@click.option("--allow-missing", is_flag=True, help="--vectors: let utterances without a vector be skipped by collect.")
@click.option("--fit-frames", default=100_000, help="frame level: fit on a random sample of this many frames.")
@click.option("--seed", default=0, help="Seed of the sample and of k-means++.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", help="Model dtype.")
@click.option("--batch-seconds", default=160.0, help="Audio per batch.")
@click.option("-j", "--num-jobs", default=0, help="Data-loading worker processes (0 = load in the main process).")
def cluster(
    prepared,
    name,
    clusters,
    level,
    model,
    layer,
    vectors,
    allow_missing,
    fit_frames,
    seed,
    device,
    dtype,
    batch_seconds,
    num_jobs,
) -> None:
    """k-means label sets for the follow-up paper's groups: units of SSL features or utterance clusters.

    Attaches the clusters to PREPARED as label set --name; then `collect` counts on them and
    `select --property NAME` (or --groups) groups by them.
    """
    import torch

    from .engine.adapter import ModelAdapter, ModelError
    from .labels.cluster import cluster_features, cluster_vectors
    from .labels.sets import LabelSetError

    corpus = _open_prepared(prepared)
    try:
        if vectors is not None:
            if level != "utterance" or model is not None:
                raise click.UsageError("--vectors clusters utterances: use it with --level utterance and no --model")
            entry = cluster_vectors(corpus, name, vectors, clusters, seed, allow_missing)
        else:
            if model is None or layer is None:
                raise click.UsageError("give --model and --layer (or --vectors with --level utterance)")
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            adapter = ModelAdapter.load(model, device=device, dtype=getattr(torch, dtype))
            entry = cluster_features(
                corpus, adapter, name, layer, clusters, level, fit_frames, seed, batch_seconds, num_jobs
            )
    except (ModelError, LabelSetError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    _print_label_set(name, entry)


def _parse_layers(text: str | None) -> list[int] | None:
    """'1,3,5-8' (1-based) → 0-based indices; None or 'all' → all layers."""
    if text is None or text == "all":
        return None
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected e.g. 1,3,5-8 (1-based) or all", param_hint="--layers") from None
    if min(out) < 1:
        raise click.BadParameter("layers are numbered from 1", param_hint="--layers")
    return [i - 1 for i in out]


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected i/n, e.g. 0/4", param_hint="--shard") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"{text!r}: need 0 <= i < n", param_hint="--shard")
    return i, n


@main.command()
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=None,
    help="LibriSpeech root; with --subset and --alignments the corpus is prepared (cached) first.",
)
@_labelling_options
@click.option(
    "--prepared",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Prepared-corpus folder to read (or to write when --root is given) [default: <alignments>/../prepared-<subset>].",
)
@click.option(
    "--model",
    default=None,
    help="Hub id or local directory of a HuBERT / wav2vec 2.0 / WavLM / data2vec-audio checkpoint [default: the embedded demo model].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Statistics store (Zarr) [default: stats.zarr, or the demo cache].",
)
@click.option(
    "--stat",
    "stats",
    multiple=True,
    type=click.Choice(["topk", "positive", "moments"]),
    help="Statistics to collect (repeatable) [default: all].",
)
@click.option(
    "--topk-ratio",
    default=0.01,
    help="λ: a neuron is activated at a token when |a| is among the top round(λ·D) of its layer.",
)
@click.option(
    "--tokens",
    type=click.Choice(["phone-mid", "all", "no-silence"]),
    default="phone-mid",
    help="Which frames count: the middle frame of each phone run (paper), all, or all but silence/spn.",
)
@click.option("--layers", default="all", help="Layers to collect, 1-based, e.g. 1,3,5-8.")
@click.option(
    "--labels",
    "label_parts",
    default=None,
    help="Label parts of the joint label, comma-separated (phone, gender, pitch_bin, attached label sets) "
    "[default: every part of the prepared corpus].",
)
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", help="Model dtype.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "triton", "triton-fused"]),
    default="auto",
    help="Statistics kernels: auto = triton on CUDA, torch on CPU; triton-fused also computes the FFN's first GEMM.",
)
@click.option("--batch-seconds", default=160.0, help="Audio per batch (the Transformer runs on padded batches).")
@click.option(
    "--max-seconds",
    type=float,
    default=None,
    help="Cut utterances into pieces of at most this length (off by default: never cut).",
)
@click.option("--checkpoint-seconds", default=300.0, help="Checkpoint at least this often.")
@click.option("--checkpoint-utterances", type=int, default=None, help="Also checkpoint every N utterances.")
@click.option(
    "--shard",
    default="0/1",
    help="Collect only shard i of n (utterances i, i+n, ...); merge shards with `neurostat merge`.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted collection in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("-j", "--num-jobs", default=1, help="Data-loading worker processes (0 = load in the main process).")
def collect(
    root,
    corpus,
    subset,
    alignments,
    pitch,
    pitch_bins,
    pitch_edges,
    phone_map,
    strict,
    prepared,
    model,
    out,
    stats,
    topk_ratio,
    tokens,
    layers,
    label_parts,
    device,
    dtype,
    backend,
    batch_seconds,
    max_seconds,
    checkpoint_seconds,
    checkpoint_utterances,
    shard,
    resume,
    overwrite,
    num_jobs,
) -> None:
    """Collect activation statistics of every FFN neuron, layer and joint label into a Zarr store.

    With no arguments it runs the embedded demo offline: it synthesises and prepares the demo corpus
    and collects with a small random-initialised HuBERT (cached in $NEUROSTAT_CACHE).
    """
    import torch

    from .corpus.prepared import PreparedCorpus, PreparedCorpusError
    from .engine.adapter import ModelAdapter, ModelError
    from .engine.collect import CollectConfig, CollectInterrupted
    from .engine.collect import collect as run_collect
    from .store import StoreError

    demo = root is None and prepared is None and model is None
    if demo:
        from .demo import ensure_demo

        cache = cache_dir() / "demo"
        click.echo(f"neurostat collect: no corpus or model given, running the embedded demo offline in {cache}")
        prepared, model = ensure_demo(cache)
        model = str(model)
        click.echo(
            "model: a small RANDOM-INITIALISED HuBERT (no trained demo model ships yet): the statistics exercise "
            "the engine but carry no property of speech"
        )
        out = out or cache / "stats.zarr"
        overwrite = overwrite or not resume
    if model is None:
        raise click.UsageError(
            "--model is required with a corpus (a hub id such as facebook/hubert-base-ls960 or a local directory)"
        )
    if root is None and prepared is None:
        raise click.UsageError("give the corpus (--root, --subset, --alignments) or a prepared corpus (--prepared)")
    config = CollectConfig(
        stats=tuple(stats) or ("topk", "positive", "moments"),
        topk_ratio=topk_ratio,
        tokens=tokens,
        layers=_parse_layers(layers),
        batch_seconds=batch_seconds,
        max_seconds=max_seconds,
        checkpoint_seconds=checkpoint_seconds,
        checkpoint_utterances=checkpoint_utterances,
        shard=_parse_shard(shard),
        num_jobs=num_jobs,
        backend=backend,
        labels=tuple(p.strip() for p in label_parts.split(",")) if label_parts else None,
    )
    out = out or Path("stats.zarr")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        adapter = ModelAdapter.load(model, device=device, dtype=getattr(torch, dtype))
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    if root is not None:
        prepared = _run_prepare(
            root,
            subset,
            alignments,
            prepared,
            adapter.geometry,
            pitch,
            pitch_bins,
            pitch_edges,
            phone_map,
            strict,
            num_jobs,
        )
    try:
        summary = run_collect(PreparedCorpus(prepared), adapter, out, config, resume=resume, overwrite=overwrite)
    except CollectInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)
    except (ModelError, StoreError, PreparedCorpusError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    _print_collect_summary(summary, out)


def _print_collect_summary(attrs: dict, out: Path) -> None:
    p = attrs["progress"]
    seconds = max(p["elapsed_seconds"], 1e-9)
    stats = attrs["statistics"]
    click.echo(
        f"collected {p['utterances_done']} utterances, {p['audio_seconds'] / 3600:.3f} h of audio, "
        f"{p['frames']:,} frames, {p['tokens']:,} tokens ({stats['tokens']}) in {seconds:.1f} s: "
        f"{p['frames'] / seconds:,.0f} frames/s, {p['audio_seconds'] / seconds:.1f}x real time"
    )
    click.echo(
        f"statistics: {', '.join(stats['stats'])}; k = {stats['k']} of {attrs['model']['width']} "
        f"(λ = {stats['topk_ratio']}); layers {attrs['fingerprint']['layers'][0]}..{attrs['fingerprint']['layers'][-1]}; "
        f"backend {stats['backend']}"
    )
    skips = {**attrs["corpus"].get("prepare_skips", {})}
    for reason, n in p.get("skips", {}).items():
        skips[reason] = skips.get(reason, 0) + n
    if skips:
        click.echo("skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(skips.items())))
    click.echo(f"store: {out}")


@main.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="The merged store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
def merge(stores, out, overwrite) -> None:
    """Merge partial stores (shards, ranks, separate runs) exactly into one."""
    from .engine.merge import merge_stores
    from .store import StoreError

    try:
        attrs = merge_stores(list(stores), out, overwrite=overwrite)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"merged {len(stores)} stores, {attrs['corpus']['utterances']} utterances -> {out}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
def info(store) -> None:
    """Print a readable summary of a statistics store."""
    from .store import StoreError, read_attrs

    try:
        attrs = read_attrs(store)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    click.echo(describe_store(store, attrs))


def describe_store(path: Path, attrs: dict) -> str:
    """The text `neurostat info` prints."""
    import json

    m, s, p = attrs["model"], attrs["statistics"], attrs.get("progress", {})
    labels = attrs["labels"]
    lines = [
        f"store: {path} ({'complete' if attrs.get('complete') else 'INCOMPLETE'}; neurostat {attrs['neurostat_version']})",
        f"model: {m['model']} ({m['model_type']}, revision {m['revision']}), {m['num_layers']} layers x {m['width']} FFN neurons",
        f"layers collected: {', '.join(map(str, attrs['fingerprint']['layers']))}",
        f"statistics: {', '.join(s['stats'])}; tokens {s['tokens']}; top-k k = {s['k']} (λ = {s['topk_ratio']}); backend {s['backend']}",
        "labels: "
        + " x ".join(f"{len(v)} {part}" for part, v in labels.items())
        + " joint labels"
        + (
            f" (pitch bins {', '.join(labels['pitch_bin'])}; edges {', '.join(f'{e:.2f}' for e in attrs['pitch']['edges'])} Hz)"
            if "pitch_bin" in labels
            else ""
        ),
        f"corpus: {attrs['corpus']['root']} / {attrs['corpus']['subset']} (shard {attrs['corpus']['shard']})",
    ]
    for name, entry in attrs.get("label_sets", {}).items():
        lines.append(f"label set {name}: {entry['level']} level, from {entry['source']}")
    if attrs.get("complete"):
        lines.append(
            f"counted: {p['utterances_done']} utterances, {p['audio_seconds'] / 3600:.3f} h, {p['frames']:,} frames, "
            f"{p['tokens']:,} tokens in {p['elapsed_seconds']:.1f} s"
        )
    else:
        pointer = Path(path) / "neurostat" / "checkpoint.json"
        if pointer.is_file():
            q = json.loads(pointer.read_text())["progress"]
            lines.append(
                f"checkpointed: {q['utterances_done']} of {attrs['corpus']['utterances']} utterances, {q['tokens']:,} tokens; "
                f"continue with `neurostat collect ... --resume`"
            )
        else:
            lines.append("no checkpoint yet")
    if p.get("skips"):
        lines.append("skipped during collect: " + ", ".join(f"{r} {n}" for r, n in sorted(p["skips"].items())))
    if attrs.get("complete"):
        from .stats import open_stats

        stats = open_stats(path)
        for part in stats.parts:
            frames = stats.frames((part,))
            top = frames.sortby(frames, ascending=False)[:8]
            lines.append(
                f"tokens per {part}{' (top 8)' if frames.size > 8 else ''}: "
                + ", ".join(f"{name} {int(n)}" for name, n in zip(top[part].values, top.values))
            )
    lines.append(f"command: {attrs.get('command', '')}")
    return "\n".join(lines)


_MAX_GROUP_ROWS = 16


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--property",
    "properties",
    multiple=True,
    help="Property to select (repeatable; several print their overlaps): phone-type, gender, pitch, phone, or the "
    "name of a label set in the store (one group per label) [default: gender].",
)
@click.option(
    "--groups",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='Own groups instead: JSON or YAML {"axis": PART, "groups": {"name": [labels]}, "within": PART, "cells": [labels]} '
    "(PART: phone, gender, pitch_bin or a label set; within defaults to phone).",
)
@click.option(
    "--sigma", default=0.8, help="σ: a group neuron is above chance for at least this fraction of the group's phones."
)
@click.option(
    "--stat", type=click.Choice(["topk", "positive"]), default="topk", help="Which activation count gives P(j | label)."
)
@click.option(
    "--rule",
    type=click.Choice(["paper", "entropy"]),
    default="paper",
    help="The paper's σ rule or LAPE's entropy rule.",
)
@click.option("--entropy-quantile", default=0.01, help="entropy rule: keep neurons in this lowest entropy quantile.")
@click.option(
    "--min-prob-quantile", default=0.95, help="entropy rule: among neurons whose largest P is in this top quantile."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="JSON in the paper's format {layer: [indices]}; with several properties a folder of <property>.json.",
)
def select(store, properties, groups, sigma, stat, rule, entropy_quantile, min_prob_quantile, out) -> None:
    """Select property neurons from a statistics store (the paper's rule by default)."""
    import warnings

    from .neuronset import NeuronSetError
    from .select import SelectionError, property_neurons, venn
    from .stats import open_stats
    from .store import StoreError

    try:
        stats = open_stats(store)
        names = [str(groups)] if groups else list(properties or ("gender",))
        selections = {}
        for name in names:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                selections[name] = property_neurons(
                    stats,
                    name,
                    sigma,
                    stat,
                    groups=groups,
                    rule=rule,
                    entropy_quantile=entropy_quantile,
                    min_prob_quantile=min_prob_quantile,
                )
            for w in caught:
                click.echo(f"warning ({name}): {w.message}", err=True)
    except (StoreError, SelectionError, NeuronSetError) as e:
        raise click.ClickException(str(e)) from None
    layers = stats.layers
    click.echo(f"{stats.path}: r = k/D = {stats.chance:.4f}, σ = {sigma}, statistic {stat}, rule {rule}")
    click.echo("layer        " + " ".join(f"{n:>5}" for n in layers) + "   total")
    for name, sel in selections.items():
        counts = sel.neurons.counts()
        click.echo(f"{name[:12]:<12} " + " ".join(f"{counts[n]:>5}" for n in layers) + f"   {len(sel.neurons)}")
        for g, s in list(sel.groups.items())[:_MAX_GROUP_ROWS]:
            click.echo(f"  N[{g}]"[:13].ljust(13) + " ".join(f"{s.counts()[n]:>5}" for n in layers) + f"   {len(s)}")
        if len(sel.groups) > _MAX_GROUP_ROWS:
            click.echo(
                f"  ... and {len(sel.groups) - _MAX_GROUP_ROWS} more groups (neurostat.select in Python has all)"
            )
    if len(selections) > 1:
        regions = venn({n: s.neurons for n, s in selections.items()})
        click.echo(
            "overlaps (exclusive regions, all layers): " + ", ".join(f"{k} {v}" for k, v in sorted(regions.items()))
        )
    if out is not None:
        if len(selections) == 1:
            out.parent.mkdir(parents=True, exist_ok=True)
            next(iter(selections.values())).neurons.save(out)
            click.echo(f"wrote {out}")
        else:
            out.mkdir(parents=True, exist_ok=True)
            for name, sel in selections.items():
                sel.neurons.save(out / f"{name}.json")
            click.echo(f"wrote {len(selections)} files to {out}")


@main.command()
@click.option("--model", required=True, help="Hub id or local directory of the model to edit.")
@click.option(
    "--neurons",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Neurons to remove: JSON {layer: [indices]} (e.g. from `neurostat select`).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Edited checkpoint directory."
)
def ablate(model, neurons, out) -> None:
    """Write an edited checkpoint whose given neurons are removed (zeroed W2 columns)."""
    from .edit import zero_neurons
    from .engine.adapter import ModelError, load_full_model
    from .neuronset import NeuronSet, NeuronSetError

    try:
        net = load_full_model(model)
        ffns = _ffn_geometry(net)
        chosen = NeuronSet.load(neurons, num_layers=len(ffns), width=max(ffns))
        zero_neurons(net, chosen)
    except (ModelError, NeuronSetError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    net.save_pretrained(out)
    _copy_feature_extractor(model, out)
    click.echo(f"zeroed {len(chosen)} neurons in {sum(1 for c in chosen.counts().values() if c)} layers -> {out}")


def _ffn_geometry(net) -> list[int]:
    from .edit import model_ffns

    return [f.width for f in model_ffns(net)]


def _copy_feature_extractor(model: str, out: Path) -> None:
    from transformers import AutoFeatureExtractor

    try:
        AutoFeatureExtractor.from_pretrained(model).save_pretrained(out)
    except (OSError, ValueError):
        click.echo(f"note: {model} has no feature-extractor config to copy", err=True)


@main.command()
@click.option("--model", required=True, help="Hub id or local directory of the model to prune.")
@click.option(
    "--protect",
    "protect_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Neurons never pruned (repeatable; e.g. property neurons from `neurostat select`).",
)
@click.option(
    "--keep-ratio",
    type=float,
    default=None,
    help="Fraction of each layer's neurons to keep (or of all, with --scope global).",
)
@click.option("--keep", type=int, default=None, help="Neurons to keep per layer (or in all, with --scope global).")
@click.option("--keep-protected-only", is_flag=True, help="Keep exactly the protected neurons.")
@click.option(
    "--scope", type=click.Choice(["layer", "global"]), default="layer", help="Budget per layer or across layers."
)
@click.option(
    "--criterion",
    type=click.Choice(["l1", "l2"]),
    default="l1",
    help="Score: ‖W1[j,:]‖ + |b1[j]| + ‖W2[:,j]‖; lowest pruned first.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pruned checkpoint directory."
)
def prune(model, protect_files, keep_ratio, keep, keep_protected_only, scope, criterion, out) -> None:
    """Prune FFN neurons physically and save a checkpoint that `neurostat.load_pruned` reads back."""
    from .engine.adapter import ModelError, load_full_model
    from .neuronset import NeuronSet, NeuronSetError
    from .pruning import PruneError, save_pruned
    from .pruning import prune as run_prune

    try:
        net = load_full_model(model)
        widths = _ffn_geometry(net)
        protected = {str(f): NeuronSet.load(f, num_layers=len(widths), width=max(widths)) for f in protect_files}
        union = NeuronSet()
        for s in protected.values():
            union = union | s
        result = run_prune(
            net,
            keep=keep,
            protect=union,
            ratio=keep_ratio,
            criterion=criterion,
            scope=scope,
            exact_protected=keep_protected_only,
        )
    except (ModelError, NeuronSetError, PruneError) as e:
        raise click.ClickException(str(e)) from None
    save_pruned(
        net, result, out, model, getattr(net.config, "_commit_hash", None), protected, feature_extractor_from=model
    )
    _copy_feature_extractor(model, out)
    click.echo(
        f"parameters: {result.params_before:,} -> {result.params_after:,} "
        f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)"
    )
    click.echo("FFN widths per layer: " + " ".join(f"{layer}:{w}" for layer, w in result.widths().items()))
    click.echo(f"pruned checkpoint: {out} (load with neurostat.load_pruned)")
