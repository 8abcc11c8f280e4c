"""DVC stage `prepare`: see `avse.pipeline.prepare`."""

from avse.cli import run_stage

if __name__ == "__main__":
    run_stage("prepare")
