"""Corpus commands: ``synth``, ``prepare``, ``labels`` and ``cluster``."""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import FRAME_LABELS, LAYOUTS, LEVELS, MODEL_DTYPES, PITCH_ALIGNS, PITCH_METHODS, PITCH_RULES
from ..corpus.synth import DEMO_SPEAKERS, DEMO_UTTERANCES
from ..engine.tokens import MODES
from ..frames import default_geometry
from .app import demo_model_name, main, preset_option, user_errors, with_preset


@main.command()
@user_errors
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--speakers", "num_speakers", default=DEMO_SPEAKERS, help="Number of speakers (alternating male/female voices)."
)
@click.option("--utterances", "utterances_per_speaker", default=DEMO_UTTERANCES, help="Utterances per speaker.")
@click.option("--subset", default="dev-clean", help="Subset folder name in the LibriSpeech layout.")
@click.option("--seed", default=0, help="Seed for voices, pitch and sentences: same seed, same corpus.")
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="librispeech",
    help="Corpus layout to write: LibriSpeech + TextGrids, TIMIT (SPHERE + .PHN), Lhotse manifests, or a CSV "
    "manifest. The other layouts carry the same audio with the phone boundaries rounded to whole samples.",
)
@user_errors
def synth(out: Path, num_speakers: int, utterances_per_speaker: int, subset: str, seed: int, layout: str) -> None:
    """Write the offline demo corpus to OUT: espeak-ng speech with exact phone timings, in the LibriSpeech layout
    (OUT/LibriSpeech/<subset>/..., SPEAKERS.TXT, OUT/alignments/<subset>/...) or in another --layout.
    """
    from ..corpus.layouts import synthesize_layout

    written = synthesize_layout(out, layout, subset, num_speakers, utterances_per_speaker, seed)
    click.echo(f"corpus ({layout}): {written.root}\nnext: {written.prepare_command(out / 'prepared')}")


def labelling_options(f):
    """Options shared by `prepare` and `collect` (which prepares its corpus itself); the labelling ones
    arrive as keyword arguments of :meth:`neurostat.corpus.prepare.PrepareSettings.from_options`."""
    options = [
        click.option(
            "--corpus",
            type=click.Choice(LAYOUTS),
            default="librispeech",
            help="Corpus layout of --root: librispeech (+ MFA TextGrids), timit (LDC layout, .PHN phones), lhotse "
            "(a folder of Lhotse manifests; needs neurostat[lhotse]) or manifest (a CSV/JSONL file of utterances).",
        ),
        click.option(
            "--subset",
            default=None,
            help="Subset: LibriSpeech's folder (e.g. dev-clean, required); TIMIT's TRAIN or TEST [default: both]; "
            "a Lhotse recipe's part (<corpus>_recordings_<part>.jsonl.gz).",
        ),
        click.option(
            "--alignments",
            type=click.Path(path_type=Path),
            default=None,
            help="Folder of MFA TextGrids (corpus layout or flat), found by utterance id: required for librispeech; "
            "for lhotse and manifest the utterances without an alignment of their own.",
        ),
        click.option(
            "--no-sa",
            is_flag=True,
            help="timit: leave out the SA sentences, which every speaker reads (as most of the literature does) "
            "[default: keep them].",
        ),
        click.option(
            "--pitch",
            type=click.Choice(PITCH_METHODS),
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
            help="JSON or TSV mapping of corpus phone symbols to ARPAbet/sil/spn (e.g. for MFA's IPA phone set), laid "
            "over the layout's own (timit: the shipped map of its 61 symbols, README 'Your own corpus').",
        ),
        click.option(
            "--strict", is_flag=True, help="Refuse (error) instead of resampling or skipping problem utterances."
        ),
        click.option(
            "--frame-labels",
            type=click.Choice(FRAME_LABELS),
            default="centre",
            help="Label a frame by the interval containing its centre, or (the paper) by the interval of largest "
            "overlap with its stride cell [20t, 20t + 20) ms.",
        ),
        click.option(
            "--pitch-rule",
            type=click.Choice(PITCH_RULES),
            default="interval",
            help="Voiced bin of f: e_i <= f < e_i+1, or (the paper) e_i < f <= e_i+1.",
        ),
        click.option(
            "--pitch-percentiles",
            default=None,
            help="Bin edges at these corpus percentiles, e.g. 33,66 (the paper) [default: equal bins, --pitch-bins].",
        ),
        click.option(
            "--pitch-step-ms",
            type=float,
            default=None,
            help="F0 analysis step in ms (the paper: 20) [default: half the model's stride].",
        ),
        click.option(
            "--pitch-align",
            type=click.Choice(PITCH_ALIGNS),
            default="time",
            help="F0 of a frame: the track read at the frame's centre, or (the paper's code) the track's frames "
            "in order, left-padded with unvoiced up to int(duration/20 ms) (needs --pitch-step-ms 20).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def source_options(no_sa: bool) -> dict:
    """The layout's own options (:func:`neurostat.corpus.source.open_source`) from the command line's."""
    return {"sa": False} if no_sa else {}


PREPARE_OPTIONS = (
    "pitch",
    "pitch_bins",
    "pitch_edges",
    "phone_map",
    "strict",
    "frame_labels",
    "pitch_rule",
    "pitch_percentiles",
    "pitch_step_ms",
    "pitch_align",
)


@main.command()
@click.option(
    "--root",
    required=True,
    type=click.Path(path_type=Path),
    help="The corpus: the LibriSpeech folder (or its parent), the TIMIT folder, a folder of Lhotse manifests, or "
    "a manifest file (see --corpus).",
)
@labelling_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Prepared-corpus folder [default: librispeech <alignments>/../prepared-<subset>; other layouts "
    "prepared-<root name>[-<subset>] beside --root].",
)
@click.option(
    "--model",
    default=None,
    callback=demo_model_name,
    help="Hub id, local dir or `demo` whose config gives the frame geometry [default: the HuBERT/wav2vec2 default geometry].",
)
@click.option("--sample-rate", type=int, default=None, help="Override the model's sample rate.")
@click.option(
    "--paper-labels",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Take the labels from the paper's official label files in this folder (phones.json, phone_table.json, "
    "pitch.json, gender.json) instead of TextGrids, SPEAKERS.TXT and F0.",
)
@click.option(
    "-j",
    "--num-jobs",
    type=click.IntRange(min=0),
    default=None,
    help="Worker processes labelling utterances, per torchrun process; 0 or 1: in this process [default: the "
    "cores this process may use, shared among torchrun's processes on the machine, at most one per 16 "
    "utterances].",
)
@preset_option
@user_errors
def prepare(
    root, corpus, subset, alignments, no_sa, out, model, sample_rate, paper_labels, num_jobs, **options
) -> None:
    """Label a corpus: phones per frame (MFA TextGrids, TIMIT's .PHN, Lhotse alignments), speaker gender
    (SPEAKERS.TXT, TIMIT's speaker folders, the manifest), F0 and pitch bins.

    Cached: a second run reuses every utterance whose inputs and settings did not change.  One prepare writes
    a folder at a time.  Under torchrun (`torchrun --nproc-per-node N -m neurostat prepare ...`, on one machine
    or several sharing the folder) every process labels a share, each with -j workers, and the folder is the
    one a single process writes.
    """
    from ..corpus.paperlabels import prepare_paper_labels
    from ..corpus.prepare import PrepareSettings, default_prepared_dir, describe_prepared, prepare_source
    from ..corpus.source import open_source
    from ..engine.distributed import PrepareRanks, World
    from ..errors import OptionError

    if paper_labels and (corpus != "librispeech" or subset is None):
        raise OptionError(
            "--paper-labels reads the paper's LibriSpeech labels: it needs --corpus librispeech and --subset"
        )
    world = World.from_environment()
    if paper_labels and world is not None:
        raise OptionError("--paper-labels reads the official label files in one process: run it without torchrun")
    if model is None:
        geometry = default_geometry(sample_rate)
    else:
        from ..model.loading import load_geometry  # through transformers, which imports torch

        geometry = load_geometry(model, sample_rate)
    if paper_labels:
        out = out or default_prepared_dir(paper_labels, subset)
        meta = prepare_paper_labels(root, subset, paper_labels, out, geometry)
    else:
        source = open_source(corpus, root, subset, alignments, **source_options(no_sa))
        settings = PrepareSettings.from_options(geometry, **with_preset(options))
        out = out or source.default_out()
        ranks = None if world is None else PrepareRanks(world)
        try:
            meta = prepare_source(source, out, settings, num_jobs=num_jobs, ranks=ranks)
        finally:
            if ranks is not None:
                ranks.close()
        if world is not None and world.rank != 0:
            return
    click.echo(describe_prepared(meta, out))


@main.command("compare-labels")
@click.argument("first", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tokens", type=click.Choice(MODES), default="phone-mid")
@user_errors
def compare_labels(first, second, tokens) -> None:
    """Compare two prepared corpora of the same utterances (e.g. neurostat's labels and --paper-labels):
    per-frame agreement, tokens per phone and per (pitch bin, phone) cell side by side."""
    from ..compare import compare_labels as compare
    from ..corpus.prepared import PreparedCorpus

    click.echo(compare(PreparedCorpus(first), PreparedCorpus(second), tokens))


@main.group()
def labels() -> None:
    """Label sets attached to a prepared corpus: extra label parts (k-means units, utterance clusters, ...).

    `collect` counts on every attached set by default (see its --labels) and `select --property NAME`
    groups by one.  File format: one utterance a line, `<id> <label> ...` (one label per model frame)
    or `<id> <label>` (one per utterance).
    """


PREPARED = click.Path(exists=True, file_okay=False, path_type=Path)


@labels.command("add")
@click.argument("prepared", type=PREPARED)
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--level",
    type=click.Choice(LEVELS),
    default="frame",
    help="One label per model frame of the prepared geometry, or one per utterance.",
)
@click.option("--allow-missing", is_flag=True, help="Let utterances without labels be skipped by collect.")
@user_errors
def labels_add(prepared, name, file, level, allow_missing) -> None:
    """Attach the labels in FILE to the prepared corpus PREPARED as label set NAME (replacing one of that name)."""
    from ..corpus.labelsets import attach_label_set, describe_label_set, read_label_file
    from ..corpus.prepared import PreparedCorpus

    entry = attach_label_set(
        PreparedCorpus(prepared), name, read_label_file(file, level), level, str(file), allow_missing
    )
    click.echo(describe_label_set(name, entry))
    if entry["unused"]:
        click.echo(
            f"{entry['unused']} utterances of {file} are not in {prepared} (skipped in prepare or another subset)"
        )


@labels.command("list")
@click.argument("prepared", type=PREPARED)
@user_errors
def labels_list(prepared) -> None:
    """List the label sets attached to PREPARED."""
    from ..corpus.labelsets import describe_label_set
    from ..corpus.prepared import PreparedCorpus

    corpus = PreparedCorpus(prepared)
    if not corpus.label_sets:
        click.echo(f"{prepared}: no label sets (parts: {', '.join(corpus.vocabularies)})")
    for name, entry in corpus.label_sets.items():
        click.echo(describe_label_set(name, entry))


@labels.command("remove")
@click.argument("prepared", type=PREPARED)
@click.argument("name")
@user_errors
def labels_remove(prepared, name) -> None:
    """Detach label set NAME from PREPARED and delete its files (labels, values and any k-means centroids)."""
    from ..corpus.prepared import PreparedCorpus

    PreparedCorpus(prepared).remove_label_set(name)
    click.echo(f"removed label set {name} from {prepared}")


@main.command()
@click.argument("prepared", type=PREPARED)
@click.option("--name", required=True, help="Name of the label set to attach (e.g. unit, spk_cluster).")
@click.option("--clusters", required=True, type=int, help="Number of k-means clusters.")
@click.option(
    "--level",
    type=click.Choice(LEVELS),
    default="frame",
    help="Cluster frames (units) or utterances (mean layer output, or --vectors).",
)
@click.option(
    "--model",
    default=None,
    callback=demo_model_name,
    help="Hub id, local directory or `demo` whose layer output is clustered.",
)
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
@click.option("--dtype", type=click.Choice(MODEL_DTYPES), default="float32", help="Model dtype.")
@click.option(
    "--batch-seconds", type=float, default=None, help="Padded audio per batch [default: 20 on a CPU, 160 on a GPU]."
)
@click.option(
    "-j",
    "--num-jobs",
    type=click.IntRange(min=0),
    default=None,
    help="Data-loading worker processes, 0 = load in the main process [default: as collect's].",
)
@user_errors
def cluster(prepared, name, **options) -> None:
    """k-means label sets for the follow-up paper's groups: units of SSL features or utterance clusters.

    Attaches the clusters to PREPARED as label set --name; then `collect` counts on them and
    `select --property NAME` (or --groups) groups by them.
    """
    from ..cluster.features import cluster_label_set
    from ..corpus.labelsets import describe_label_set
    from ..corpus.prepared import PreparedCorpus

    click.echo(describe_label_set(name, cluster_label_set(PreparedCorpus(prepared), name, **options)))
