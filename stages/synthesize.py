"""DVC stage `synthesize`: see `avse.pipeline.synthesize`."""

from avse.cli import run_stage

if __name__ == "__main__":
    run_stage("synthesize")
