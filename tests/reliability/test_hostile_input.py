"""Hostile input: malformed tables and configs end in one clear line (exit 2, no traceback),
never a hang; absurd rows are dropped with a reason; secrets never reach the output."""
import gzip
import subprocess
import sys

import pytest

from cldr_dist.config import ConfigError, load_config
from cldr_dist.data.tables import DataError, load_tables

from tests.conftest import HELD_OUT, REPO


def lines(path):
    return gzip.open(path, "rt").read().splitlines() if path.suffix == ".gz" else path.read_text().splitlines()


def write(path, rows):
    text = "\n".join(rows) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "cldr_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_wrong_delimiter_names_the_file(data_dir):
    resp = data_dir / "responses.csv.gz"
    write(resp, [line.replace(",", ";") for line in lines(resp)])
    with pytest.raises(DataError, match="responses.csv.gz: missing column"):
        load_tables(data_dir)


def test_non_utf8_bytes(data_dir):
    (data_dir / "drugs.csv").write_bytes((data_dir / "drugs.csv").read_bytes() + b"999,\xff\xfe,1,CCO\n")
    with pytest.raises(DataError, match="drugs.csv: not UTF-8"):
        load_tables(data_dir)


def test_extra_columns_in_responses_are_ignored(data_dir):
    resp = data_dir / "responses.csv.gz"
    rows = lines(resp)
    write(resp, [rows[0] + ",note"] + [r + ",x" for r in rows[1:]])
    assert len(load_tables(data_dir).responses) == 1200


def test_absurd_values_and_huge_smiles_are_bad_rows(data_dir):
    resp = data_dir / "responses.csv.gz"
    rows = lines(resp)
    rows[1] = ",".join(rows[1].split(",")[:2] + ["1e300"])
    rows[2] = ",".join(rows[2].split(",")[:2] + ["-inf"])
    rows[3] = ",".join(rows[3].split(",")[:2] + ["nan"])
    write(resp, rows)
    drugs = lines(data_dir / "drugs.csv")
    drugs.append("777,Huge,1," + "C" * 1_000_000)
    write(data_dir / "drugs.csv", drugs)
    t = load_tables(data_dir)
    reasons = {(b.file, b.line): b.reason for b in t.bad_rows}
    assert reasons[("responses.csv.gz", 2)].startswith("ln_ic50 beyond")
    assert reasons[("responses.csv.gz", 3)] == reasons[("responses.csv.gz", 4)] == "missing or non-numeric ln_ic50"
    assert "1000000 characters" in reasons[("drugs.csv", len(drugs))]
    assert len(t.responses) == 1197


def test_ten_thousand_duplicate_rows(data_dir):
    resp = data_dir / "responses.csv.gz"
    rows = lines(resp)
    write(resp, rows + [rows[1]] * 10_000)
    t = load_tables(data_dir)
    assert len(t.responses) == 1200
    assert sum(b.reason == "duplicate (cosmic_id, drug_id) pair" for b in t.bad_rows) == 10_000


@pytest.mark.parametrize("text,match", [
    ("train:\n  lr: fast\n", "train.lr: expected float"),
    ("train:\n  nonsense: 1\n", "unknown config key train.nonsense"),
    ("bogus:\n  a: 1\n", "unknown config section 'bogus'"),
    ("train: [1, 2]\n", "section 'train' must be a mapping"),
    ("train:\n  epochs: 2.5\n", "train.epochs: expected int"),
    ("ray:\n  use_gpu: maybe\n", "ray.use_gpu: expected true/false"),
    ("train:\n  lr: -1\n", "train.lr must be positive"),
    ("{{{", "not valid YAML"),
])
def test_bad_configs(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    """One case through the real entry point (`python -m cldr_dist.cli`), the rest in process,
    where a traceback would be an exception out of main (a subprocess costs ~9 s of imports)."""
    from cldr_dist import cli as cldr_cli
    proc = cli("shards", "data.nope=1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    for args in (["shards", "--config", str(tmp_path / "missing.yaml")], ["pretrain", "train.batch_size=zero"],
                 ["shards", "notanoverride"]):
        assert cldr_cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cldr {args[0]}: error: ") and err.strip().count("\n") == 0, err


def test_secrets_never_printed(tmp_path):
    """Wrong credentials against a dead endpoint: a clear error, and the secret is nowhere in it."""
    import os
    secret = "SECRETvalue1234567890abcdef"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIA" + secret[:12], "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    proc = cli("shards", "--out", "s3://no-such-bucket/x", f"data.held_out_drugs={HELD_OUT}", "--quiet",
               env=env, timeout=180)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert secret not in out and secret[:12] not in out
    assert "no-such-bucket" in proc.stderr and "Traceback" not in proc.stderr
