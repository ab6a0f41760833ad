"""headlab: the command line above the analyses and the dashboard (``headlab/cli.py``)."""
