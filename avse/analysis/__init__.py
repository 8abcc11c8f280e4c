"""Analysis of pipeline outputs and tracked runs, for the command line and the notebooks."""
