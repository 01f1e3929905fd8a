"""Rank 0's metrics CSV (train/runlog.py): its header survives a run killed at once, and a CSV
without one is an error naming the file, not a table read with a data row for column names."""
import pytest

from cldr_dist.train.runlog import CSV_HEADER, MetricsCSVError, RunLog, epoch_values, metric_rows


def test_the_header_is_on_disk_as_soon_as_the_log_opens(tmp_path):
    RunLog(str(tmp_path), "pretrain", 0)   # the run is killed before it logs a metric
    assert (tmp_path / "pretrain_metrics.csv").read_text().splitlines() == [",".join(CSV_HEADER)]


def test_a_resume_after_a_run_killed_before_its_header_writes_one(tmp_path):
    """A run killed in the moment before its header reached the disk left the CSV empty; its
    resume used to append rows to it headerless."""
    (tmp_path / "pretrain_metrics.csv").write_text("")
    log = RunLog(str(tmp_path), "pretrain", 0)
    log.scalars(1, 19, {"val_zeroshot_pcc": 0.25})
    log.sync()
    text = (tmp_path / "pretrain_metrics.csv").read_text()
    assert text.splitlines()[0] == ",".join(CSV_HEADER)
    assert epoch_values(text, "val_zeroshot_pcc") == {1: 0.25}


def test_a_metrics_csv_without_its_header_is_one_error_naming_it():
    with pytest.raises(MetricsCSVError, match=r"^curves/x-pretrain.csv: not a metrics CSV: its first line is "
                                              r"'363.774,1,19,val_mse,0.005'"):
        metric_rows("363.774,1,19,val_mse,0.005\n363.774,1,19,val_pcc,0.1\n", "curves/x-pretrain.csv")
    assert metric_rows("") == []   # a run that never opened its log
