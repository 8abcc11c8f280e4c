"""DVC stage `evaluate`: see `avse.pipeline.evaluate`."""

from avse.cli import run_stage

if __name__ == "__main__":
    run_stage("evaluate")
