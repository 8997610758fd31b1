"""Selection command: ``select``."""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import SELECTION_RULES
from ..declarations import COUNT_STATS
from .app import main, user_errors


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
    "--sigma",
    default=0.8,
    help="σ: a group neuron is above chance for at least this fraction of the group's cells (its phones, or "
    "the labels of the groups file's `within`).",
)
@click.option(
    "--stat", type=click.Choice(COUNT_STATS), default="topk", help="Which activation count gives P(j | label)."
)
@click.option(
    "--rule",
    type=click.Choice(SELECTION_RULES),
    default="paper",
    help="The paper's σ rule or LAPE's entropy rule.",
)
@click.option("--entropy-quantile", default=0.01, help="entropy rule: keep neurons in this lowest entropy quantile.")
@click.option(
    "--min-prob-quantile", default=0.95, help="entropy rule: among neurons whose largest P is in this top quantile."
)
@click.option(
    "--min-tokens",
    default=0,
    help="Leave (group, cell) cells with fewer tokens out of the group's denominator (a departure from the paper, "
    "which keeps them and counts an empty cell as not above chance).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write the neurons in the paper's format {layer: [indices]}: a FILE.json (one property), or "
    "a folder of <property>.json files.",
)
@user_errors
def select(store, properties, groups, out, **settings) -> None:
    """Select property neurons from a statistics store (the paper's rule by default)."""
    from ..select import describe_selections, save_selections, select_properties
    from ..stats import open_stats

    stats = open_stats(store)
    selections, warnings = select_properties(stats, properties, groups, **settings)
    for message in warnings:
        click.echo(message, err=True)
    click.echo(describe_selections(stats, selections))
    if out is not None:
        click.echo(save_selections(selections, out, store))
