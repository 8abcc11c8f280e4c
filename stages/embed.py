"""DVC stage `embed`: see `avse.pipeline.embed`."""

from avse.cli import run_stage

if __name__ == "__main__":
    run_stage("embed")
