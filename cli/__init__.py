"""The clipdex command-line interface."""
