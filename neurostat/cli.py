"""The ``neurostat`` command line: a click group of subcommands."""

from __future__ import annotations

import os
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
        from .engine.adapter import load_geometry

        geo = load_geometry(model)
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
    click.echo(f"corpus: {root}\nalignments: {align}\n"
               f"next: neurostat prepare --root {root} --subset {subset} --alignments {align} --out {out / 'prepared'}")


@main.command()
@click.option("--corpus", type=click.Choice(["librispeech"]), default="librispeech", help="Corpus layout.")
@click.option("--root", required=True, type=click.Path(path_type=Path), help="LibriSpeech root (the LibriSpeech folder or its parent).")
@click.option("--subset", required=True, help="Subset folder, e.g. dev-clean.")
@click.option("--alignments", required=True, type=click.Path(path_type=Path), help="Folder of MFA TextGrids (corpus layout or flat).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Prepared-corpus folder [default: <alignments>/../prepared-<subset>].")
@click.option("--model", default=None, help="Hub id or local dir whose config gives the frame geometry [default: the HuBERT/wav2vec2 default geometry].")
@click.option("--sample-rate", type=int, default=None, help="Override the model's sample rate.")
@click.option("--pitch", type=click.Choice(["praat", "yaapt"]), default="praat", help="F0 tracker (yaapt needs neurostat[paper]).")
@click.option("--pitch-bins", default=3, help="Number of voiced pitch bins at equal corpus percentiles.")
@click.option("--pitch-edges", default=None, help="Comma-separated bin edges in Hz instead of percentiles (e.g. 129.03,179.78).")
@click.option("--phone-map", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON or TSV mapping of corpus phone symbols to ARPAbet/sil/spn (e.g. for MFA's IPA phone set).")
@click.option("--strict", is_flag=True, help="Refuse (error) instead of resampling or skipping problem utterances.")
@click.option("-j", "--num-jobs", default=1, help="Parallel worker processes.")
def prepare(corpus, root, subset, alignments, out, model, sample_rate, pitch, pitch_bins, pitch_edges, phone_map, strict, num_jobs) -> None:
    """Label a corpus: phones per frame (MFA TextGrids), speaker gender (SPEAKERS.TXT), F0 and pitch bins.

    Cached: a second run reuses every utterance whose inputs and settings did not change.
    """
    from .corpus.librispeech import CorpusError
    from .corpus.prepare import PrepareError, PrepareSettings, prepare as run_prepare
    from .labels.speakers import SpeakersError
    from .phones import PhoneMap

    if pitch_bins < 1:
        raise click.BadParameter("need at least one pitch bin", param_hint="--pitch-bins")
    edges = None
    if pitch_edges:
        try:
            edges = tuple(float(x) for x in pitch_edges.split(","))
        except ValueError:
            raise click.BadParameter(f"{pitch_edges!r} is not a comma-separated list of numbers", param_hint="--pitch-edges") from None
    out = out or Path(alignments).parent / f"prepared-{subset}"
    settings = PrepareSettings(geometry=_geometry(model, sample_rate), pitch=pitch,
                               quantiles=tuple(i / pitch_bins for i in range(1, pitch_bins)), edges=edges,
                               phone_map=PhoneMap.from_file(phone_map) if phone_map else PhoneMap(), strict=strict)
    try:
        meta = run_prepare(root, subset, alignments, out, settings, num_jobs=num_jobs)
    except (CorpusError, PrepareError, SpeakersError) as e:
        raise click.ClickException(str(e)) from None
    _print_prepare_summary(meta, out)


def _print_prepare_summary(meta: dict, out: Path) -> None:
    click.echo(f"prepared {meta['num_utterances']} utterances, {meta['hours']:.3f} h, {meta['num_frames']} frames -> {out}")
    from .frames import FrameGeometry

    click.echo(f"frame geometry: {FrameGeometry.from_dict(meta['geometry']).describe()}; "
               f"pitch ({meta['pitch']['method']}) bin edges: {', '.join(f'{e:.2f} Hz' for e in meta['pitch']['edges'])}")
    if meta["resampled"]:
        click.echo(f"resampled to {meta['geometry']['sample_rate']} Hz: {meta['resampled']} utterance(s)")
    if meta["skips"]:
        click.echo("skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(meta["skips"].items()))
                   + f" (details: {out / 'skips.jsonl'})")
