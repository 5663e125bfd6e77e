"""``python -m wsi_scaat`` runs the CLI (used by the Snakemake rules)."""

from wsi_scaat.cli import app

app(prog_name="wsi-scaat")
