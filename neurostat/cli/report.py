"""Report commands: ``report`` and ``browse``."""

from __future__ import annotations

from pathlib import Path

import click

from .app import allow_other_model, main, user_errors


def neuron_options(command):
    """--neurons FILE ..., --allow-other-model and --sigma: which neurons a report or browser shows."""
    command = click.option("--sigma", default=0.8, help="σ of the selection when no --neurons are given.")(command)
    command = allow_other_model(command)
    return click.option(
        "--neurons",
        "neuron_files",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Neuron files in the paper's format {layer: [indices]} (repeatable; from `neurostat select --out`), "
        "each shown under its file name [default: the paper's properties selected from the store].",
    )(command)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@neuron_options
@click.option(
    "--probe",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Probe results JSON (`neurostat probe --out`, bench/claims_bench.py): adds ablation bars and pruning curves.",
)
@click.option(
    "--probe-where",
    "probe_where",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only the probe results whose tag KEY is VALUE (repeatable), e.g. split=voice for one kind of "
    "bench/claims_bench.py's splits; results that differ only in a seed are pooled (mean ± s.d.).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the report.")
@user_errors
def report(store, neuron_files, allow_other_model, sigma, probe, probe_where, out) -> None:
    """Pictures of a store's property neurons (PNG) and one self-contained HTML page: neurons per layer,
    overlaps between properties, P(j | label) heatmaps, per-layer probability histograms, and with
    --probe the probes of ablated and pruned models."""
    from ..report import build_report

    if probe_where and probe is None:
        raise click.BadParameter("filters the results of --probe FILE, and none was given", param_hint="--probe-where")
    where = {}
    for item in probe_where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--probe-where")
        if key in where:
            raise click.BadParameter(f"{key} is given twice ({where[key]}, {value})", param_hint="--probe-where")
        where[key] = value
    summary = build_report(store, out, list(neuron_files), sigma, probe, where, allow_other_model)
    for note in summary["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {len(summary['figures'])} figures and index.html to {out}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--prepared",
    "prepared",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The prepared corpus the store was collected from (the pages play its audio); "
    "default: the one the store records.",
)
@neuron_options
@click.option("--all", "every", is_flag=True, help="A page for every neuron of every collected layer.")
@click.option("--context", default=0.5, help="Seconds of audio on each side of a top frame.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the site.")
@user_errors
def browse(store, prepared, neuron_files, allow_other_model, every, sigma, context, out) -> None:
    """A static neuron browser: an index searchable by layer, neuron and property, and a page per neuron with
    its P(j | phone) profile, gender and pitch contrasts and its top frames as playable audio (needs a store
    collected with --top-frames). Open OUT/index.html, or serve OUT with `python -m http.server`."""
    from ..browse import build_browser

    summary = build_browser(store, prepared, out, list(neuron_files), every, sigma, context, allow_other_model)
    click.echo(
        f"wrote {summary['pages']} neuron pages ({summary['windows']} top frames to listen to, from "
        f"{summary['audio_files']} utterances' audio: {summary['audio_bytes'] / 2**20:.1f} MiB of FLAC) to {out}"
    )
