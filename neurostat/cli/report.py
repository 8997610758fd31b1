"""Report command: ``report``."""

from __future__ import annotations

from pathlib import Path

import click

from .app import main, user_errors


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--neurons",
    "neuron_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Neuron files in the paper's format {layer: [indices]} (repeatable; from `neurostat select --out`), each "
    "shown under its file name [default: the paper's properties selected from the store].",
)
@click.option("--sigma", default=0.8, help="σ of the selection when no --neurons are given.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the report.")
@user_errors
def report(store, neuron_files, sigma, out) -> None:
    """Pictures of a store's property neurons (PNG) and one self-contained HTML page: neurons per layer,
    overlaps between properties, P(j | label) heatmaps, per-layer probability histograms."""
    from ..report import build_report

    summary = build_report(store, out, list(neuron_files), sigma)
    click.echo(f"wrote {len(summary['figures'])} figures and index.html to {out}")
