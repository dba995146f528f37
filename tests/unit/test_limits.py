"""Reading the cluster's limits (slurm/limits.py): the parts that need no cluster."""

from __future__ import annotations

from slurm.limits import ClusterLimits, parse_config


def test_parse_config_reads_scontrol_lines() -> None:
    text = "Configuration data as of x\nMaxArraySize            = 1001\nMaxJobCount = 10000\n"
    config = parse_config(text)
    assert config["MaxArraySize"] == "1001" and config["MaxJobCount"] == "10000"


def test_fits_counts_rows_against_the_free_slots() -> None:
    assert ClusterLimits(1001, None, "").fits(10**6)
    assert ClusterLimits(1001, 5, "MaxSubmitJobs").fits(5)
    assert not ClusterLimits(1001, 5, "MaxSubmitJobs").fits(6)
