"""DVC stage `train`: see `avse.pipeline.train`."""

from avse.cli import run_stage

if __name__ == "__main__":
    run_stage("train")
