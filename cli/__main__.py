from clipdex.cli.start import run

run()
