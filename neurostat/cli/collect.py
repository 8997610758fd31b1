"""Collection commands: ``collect``, ``merge`` and ``info``."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from ..choices import BACKENDS, FRONT_ENDS, MODEL_DTYPES, PRECISIONS
from ..declarations import DECLARATIONS, DEFAULT_STATS
from ..engine.tokens import MODES
from .app import demo_model_name, main, preset_option, user_errors, with_preset
from .corpus import PREPARE_OPTIONS, labelling_options, source_options


def _layers(ctx, param, text: str) -> list[int] | None:
    """'1,3,5-8' (1-based) → [1, 3, 5, 6, 7, 8]; 'all' → None."""
    if text == "all":
        return None
    out = []
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        if dash and not (lo.strip() and hi.strip()):
            raise click.BadParameter(f"{text!r}: the range {part!r} is open; give both ends (e.g. 1-12) or all")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise click.BadParameter(f"{text!r}: expected e.g. 1,3,5-8 (1-based) or all") from None
        if last < first:
            raise click.BadParameter(f"{text!r}: the range {part} is empty; write it low-high, e.g. {last}-{first}")
        out.extend(range(first, last + 1))
    if min(out) < 1:
        raise click.BadParameter("layers are numbered from 1")
    return out


def _shard(ctx, param, text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"{text!r}: need 0 <= i < n")
    return i, n


@main.command()
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=None,
    help="The corpus (in the --corpus layout, with the --subset and --alignments it takes), prepared (cached) first.",
)
@labelling_options
@click.option(
    "--prepared",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Prepared-corpus folder to read (or to write when --root is given) [default: prepare's].",
)
@click.option(
    "--model",
    default=None,
    callback=demo_model_name,
    help="Hub id or local directory of a checkpoint of a supported family (README: Supported families), or `demo` "
    "(the shipped demo model); without --model, --root or --prepared: the demo model on the demo corpus.",
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
    type=click.Choice(list(DECLARATIONS)),
    help=f"Statistics to collect (repeatable) [default: {', '.join(DEFAULT_STATS)}; "
    f"{', '.join(n for n in DECLARATIONS if n not in DEFAULT_STATS)} are opt-in].",
)
@click.option(
    "--top-frames",
    type=int,
    is_flag=False,
    flag_value=16,
    default=None,
    help="Also keep each neuron's N largest activations over the corpus with their utterance and frame "
    "(N = 16 when given without a value): what the neuron browser plays.",
)
@click.option(
    "--topk-ratio",
    default=0.01,
    help="λ: a neuron is activated at a token when |a| is among the top round(λ·D) of its layer.",
)
@click.option(
    "--tokens",
    type=click.Choice(MODES),
    default="phone-mid",
    help="Which frames count: the middle frame of each phone run (paper), all, or all but silence/spn.",
)
@click.option(
    "--drop-final-run", is_flag=True, help="Count no token of an utterance's last run of frames (the paper's code)."
)
@click.option(
    "--layers",
    default="all",
    callback=_layers,
    help="Encoder layers to collect, 1-based, e.g. 1,3,5-8; a Conformer layer's two FFNs (ffn1, ffn2) both.",
)
@click.option(
    "--labels",
    "label_parts",
    default=None,
    help="Label parts of the joint label, comma-separated (phone, gender, pitch_bin, attached label sets) "
    "[default: every part of the prepared corpus].",
)
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    type=click.Choice(("auto", *MODEL_DTYPES)),
    default="auto",
    help="Model dtype; auto = bfloat16 on a GPU of compute capability 8+ (float16 on older ones), float32 on a "
    "CPU. Half precision is safe for the counts: the statistics see fp32 activations (--stats-precision).",
)
@click.option(
    "--backend",
    type=click.Choice(("auto", *BACKENDS)),
    default="auto",
    help="Statistics kernels: auto = triton on CUDA, torch on CPU; triton-fused also computes the FFN's first GEMM.",
)
@click.option(
    "--stats-precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    help="Activations the statistics see in a float16/bfloat16 run: fp32 = act(x W1ᵀ + b1) accumulated in fp32 "
    "(unbiased top-k; one first GEMM with an fp32 output, whose rounding the model goes on from), "
    "model = the half-precision values the model computes (bf16 ties at the k-th |a| favour low neuron indices). "
    "Same for float32 models.",
)
@click.option(
    "--front-end",
    type=click.Choice(("auto", *FRONT_ENDS)),
    default="auto",
    help="How the conv feature encoder runs on a padded batch (exact either way): gemm = channels-last GEMMs, "
    "batched = the model's convolutions, per-utterance = the model's modules one utterance at a time; "
    "auto = gemm.",
)
@click.option(
    "--batch-seconds",
    type=float,
    default=None,
    help="Padded audio per batch: utterances x the longest, similar lengths together [default: 20 on a CPU, 160 on a GPU].",
)
@click.option(
    "--max-seconds",
    type=float,
    default=None,
    help="Cut utterances into pieces of at most this length (off by default: never cut).",
)
@click.option("--checkpoint-seconds", default=300.0, help="Checkpoint at least this often.")
@click.option("--checkpoint-utterances", type=int, default=None, help="Also checkpoint every N utterances.")
@click.option(
    "--keep-checkpoint",
    is_flag=True,
    help="Keep the last checkpoint's state beside a complete store (dropped by default).",
)
@click.option(
    "--shard",
    default="0/1",
    callback=_shard,
    help="Collect only shard i of n (utterances i, i+n, ...); merge shards with `neurostat merge`.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted collection in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option(
    "-j",
    "--num-jobs",
    type=click.IntRange(min=0),
    default=None,
    help="Data-loading worker processes, 0 = load in the main process [default: on a GPU the cores less 2, at "
    "most 12; on a CPU 0 up to 4 cores, else 1, and torch's threads take the other cores]. With --root also "
    "the labelling workers of its prepare (at least 1) [default there: as `prepare -j`'s].",
)
@preset_option
@user_errors
def collect(
    root, corpus, subset, alignments, no_sa, prepared, model, out, device, dtype, resume, overwrite, **options
) -> None:
    """Collect activation statistics of every FFN neuron, layer and joint label into a Zarr store.

    The model is any supported encoder: HuBERT, wav2vec 2.0, WavLM, data2vec, UniSpeech(-SAT),
    Wav2Vec2-Conformer, w2v-BERT 2.0 and Parakeet (two FFNs a layer: ffn1, ffn2) or Whisper's encoder
    (its decoder is not collected), base or fine-tuned (a CTC or seq2seq head around the encoder).

    With no arguments it runs the embedded demo offline: it synthesises and prepares the demo corpus
    and collects the statistics of neurostat's demo model, a small HuBERT pre-trained on synthetic speech,
    counting every frame (--tokens all, as the corpus is small; cached in $NEUROSTAT_CACHE/demo-v4).
    """
    from ..engine.collect import CollectConfig, CollectInterrupted, collect_corpus, describe_collect
    from ..engine.device import resolve_device
    from ..engine.distributed import PrepareRanks, World
    from ..errors import OptionError

    preset = options.get("preset")
    options = with_preset(options)
    prepare_options = {name: options.pop(name) for name in PREPARE_OPTIONS}
    labels, options["stats"] = options.pop("label_parts"), options["stats"] or CollectConfig.stats
    if options["top_frames"] is None:
        options["top_frames"] = CollectConfig.top_frames
    elif "top_frames" not in options["stats"]:
        options["stats"] = (*options["stats"], "top_frames")
    demo = root is None and prepared is None and model is None
    if (
        demo
        and preset is None
        and click.get_current_context().get_parameter_source("tokens") is ParameterSource.DEFAULT
    ):
        from ..demo import DEMO_TOKENS

        options["tokens"] = DEMO_TOKENS
    config = CollectConfig(
        **options,
        labels=tuple(p.strip() for p in labels.split(",")) if labels else None,
        command=shlex.join(sys.argv),
    )
    if demo:
        from ..demo import DEMO_NOTE, cache_dir, ensure_demo

        world = World.from_environment()
        if world is not None:
            world.init(resolve_device(world.device(device)))
        if world is None or world.rank == 0:
            click.echo(
                f"neurostat collect: no corpus or model given, running the embedded demo offline in {cache_dir()}"
            )
            click.echo(DEMO_NOTE)
        prepared, model = ensure_demo(cache_dir(), ranks=None if world is None else PrepareRanks(world))
        out, overwrite = out or cache_dir() / "stats.zarr", overwrite or not resume
    if model is None:
        raise OptionError("--model is required with a corpus (a hub id such as facebook/hubert-base-ls960 or a folder)")
    out = out or Path("stats.zarr")
    try:
        summary = collect_corpus(
            str(model), out, config, prepared, root, subset, alignments, corpus, prepare_options,
            device, dtype, resume, overwrite, echo=click.echo, preset=preset, source_options=source_options(no_sa),
        )  # fmt: skip
    except CollectInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(describe_collect(summary, out))


@main.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="The merged store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@user_errors
def merge(stores, out, overwrite) -> None:
    """Merge partial stores (shards, ranks, separate runs) exactly into one."""
    from ..engine.merge import merge_stores

    meta = merge_stores(list(stores), out, overwrite=overwrite)
    click.echo(f"merged {len(stores)} stores, {meta.corpus['utterances']} utterances -> {out}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--verify", is_flag=True, help="Also check every array file's checksum against the store's manifest.")
@user_errors
def info(store, verify) -> None:
    """Print a readable summary of a statistics store (a missing or damaged file is an error)."""
    from ..stats import describe_store
    from ..store import verify_store

    if verify:
        click.echo(f"verified {verify_store(store, checksums=True)} files against the manifest")
    click.echo(describe_store(store))
