"""The runner copies a training run's curve from the run's storage (S3 here), where rank 0's
RunLog uploads it, into RUN_DIR/curves/ - not from a local path on the driver."""
from types import SimpleNamespace

from cldr_dist.experiment.runner import run_stage
from cldr_dist.experiment.spec import ExperimentSpec, stage_config


def test_run_stage_reads_the_curve_from_s3(s3_bucket, tmp_path, monkeypatch):
    from cldr_dist.train import trainer
    from cldr_dist.train.runlog import RunLog
    spec = ExperimentSpec(name="t", out=str(tmp_path), layers={
        "common": {"ray": {"storage_path": f"{s3_bucket}/ray"}}, "pretrain": {}, "finetune": {}})
    cfg = stage_config(spec, "pretrain", "graphdrp", "mixed", 171)

    def fake_run(cfg):  # what rank 0 does in a real run: log, then sync at a checkpoint
        log = RunLog(trainer.log_dir(cfg), cfg.train.mode, 0)
        log.scalars(0, 1, {"loss": 3.0})
        log.sync()
        return SimpleNamespace(checkpoint=SimpleNamespace(path=f"{s3_bucket[5:]}/ray/{cfg.ray.name}/checkpoint_0"),
                               metrics={"step": 1})
    monkeypatch.setattr(trainer, "run", fake_run)
    record = run_stage(spec, cfg, "mixed-graphdrp-cldr-s171-pretrain", log=lambda *_: None)
    assert trainer.log_dir(cfg) == f"{s3_bucket}/ray/t-mixed-graphdrp-cldr-s171-pretrain/logs"
    assert record["checkpoint"].startswith(f"{s3_bucket}/ray/")
    curve = (tmp_path / "t" / "curves" / "mixed-graphdrp-cldr-s171-pretrain.csv").read_text().splitlines()
    assert curve[0] == "time,epoch,step,name,value" and curve[1].endswith(",0,1,loss,3.0")
