"""`vantage lists show|update`."""

from __future__ import annotations

import click

from test_lists.download import DEFAULT_TIMEOUT, update_lists
from test_lists.loader import BUNDLED_LISTS, load_input_file, load_list, resolve_list, filter_categories

from .common import cell, console, safe, to_json


@click.group("lists")
def lists() -> None:
    """Show and download test lists (Citizen Lab format)."""


@lists.command("show")
@click.option("--list", "list_name", default="default", show_default=True, metavar="NAME",
              help="default, high-risk (the sensitive categories the default leaves out), global, a two-letter "
                   "country code (after `vantage lists update`), or a CSV path.")
@click.option("--input-file", type=click.Path(dir_okay=False),
              help="A plain file with one URL per line (# comments) instead of --list.")
@click.option("--category", "categories", multiple=True, metavar="CODE",
              help="Keep only this category code (e.g. NEWS, HUMR); repeatable; case-insensitive.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show(list_name: str, input_file: str | None, categories: tuple[str, ...], as_json: bool) -> None:
    """Print the entries of a test list."""
    if input_file:
        source = input_file
        entries = filter_categories(load_input_file(input_file), categories, input_file)
    else:
        path = resolve_list(list_name)
        source = list_name if list_name in BUNDLED_LISTS else str(path)
        entries = load_list(path, categories)
    if as_json:
        click.echo(to_json({"list": source, "count": len(entries), "entries": [e.as_dict() for e in entries]}))
        return
    from rich.table import Table

    # A downloaded list is text from the network: every cell is escaped.
    table = Table(title=cell(f"test list: {safe(source)}"), show_lines=False)
    table.add_column("URL", overflow="fold")
    table.add_column("Category")
    table.add_column("Description")
    table.add_column("Added")
    table.add_column("Source")
    for e in entries:
        table.add_row(*(cell(v) for v in (e.url, e.category_code, e.category_description, e.date_added, e.source)))
    out = console()
    out.print(table)
    out.print(f"{len(entries)} entries")


@lists.command("update")
@click.option("--country", "countries", multiple=True, metavar="CC",
              help="Also download this country's list (two-letter code, or cis); repeatable.")
@click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds allowed for the whole download.")
def update(countries: tuple[str, ...], timeout: float) -> None:
    """Download the global list (and country lists) from Citizen Lab into the cache.

    The source URL can be changed with VANTAGE_TEST_LISTS_URL (a mirror).
    """
    for item in update_lists(countries, timeout=timeout):
        click.echo(f"{safe(item.name)}: {item.entries} entries -> {item.path}")
