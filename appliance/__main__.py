"""``python -m appliance``: the command line."""

from appliance.cli.main import run

run()
