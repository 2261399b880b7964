from clipdex.cli.main import run

run()
