"""deepimage: a reproduction of Baidu's Deep Image (2015) as a Snakemake workflow."""

__version__ = "0.1.0"
