"""``neurostat probe``: frozen-feature linear probes of one or several models."""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import PROBE_TASKS
from .app import demo_model_name, main, user_errors


@main.command()
@click.option(
    "--model",
    required=True,
    callback=demo_model_name,
    help="Hub id, checkpoint folder, pruned checkpoint (`neurostat prune`) or `demo` (the shipped demo model).",
)
@click.option(
    "--prepared",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Prepared corpus (`neurostat prepare`) with phones, gender and F0.",
)
@click.option(
    "--compare",
    multiple=True,
    callback=demo_model_name,
    help="More models to probe the same way (repeatable); the table shows their deltas.",
)
@click.option(
    "--task",
    "tasks",
    multiple=True,
    type=click.Choice(PROBE_TASKS),
    help="Probe to run (repeatable; default all).",
)
@click.option(
    "--fixed-probes",
    is_flag=True,
    help="Read the --compare models with the first model's probes instead of fitting their own (the view of "
    "a downstream head that is not retrained).",
)
@click.option(
    "--layer", type=int, default=None, help="Probe this layer (1-based) only; default: a learnt weighted sum."
)
@click.option(
    "--test-fraction", type=float, default=0.3, show_default=True, help="Share of each gender's speakers held out."
)
@click.option(
    "--groups",
    default=None,
    help="Hold out whole groups of speakers instead of speakers (per gender), so no test speaker shares a "
    "group with a training speaker: `voices` (the voices of a `neurostat synth` corpus) or a file of "
    "`speaker group` lines.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the speaker split and frame sample.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the results as JSON.")
@user_errors
def probe(model, prepared, compare, tasks, fixed_probes, layer, test_fraction, groups, seed, device, out) -> None:
    """Fit linear probes (phone, phone type, gender, pitch bin, log F0) on frozen layer outputs, trained on
    speakers (or --groups) disjoint from the test speakers, and print a table of the metrics (and deltas
    with --compare)."""
    from ..corpus.prepared import PreparedCorpus
    from ..probe import probe_model, save_results, speaker_groups, table

    corpus = PreparedCorpus(prepared)
    held_out = None if groups is None else speaker_groups(corpus, groups)
    results, fitted = [], {}
    for i, source in enumerate((model, *compare)):
        click.echo(f"probing {source}", err=True)
        reuse = fitted if (i == 0 or fixed_probes) else None
        tag = {"model": Path(source).name, "probes": "fixed"} if i and fixed_probes else None
        results.append(
            probe_model(
                source,
                corpus,
                tuple(tasks) or PROBE_TASKS,
                layer,
                seed,
                test_fraction,
                device,
                tag,
                fitted=reuse,
                groups=held_out,
            )
        )
    click.echo(table(results))
    if out:
        click.echo(f"results: {save_results(results, out)}")
