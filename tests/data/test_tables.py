"""Bad input: bad rows are dropped, counted and reported; missing files/columns are one-line
errors and nothing is written."""
import csv
import gzip
import subprocess
import sys

import pytest

from cldr_dist.data.tables import DataError, load_tables

from tests.conftest import HELD_OUT


def rewrite(path, edit):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with opener(path, "wt", newline="") as f:
        csv.writer(f).writerows(rows)


def test_clean_tiny_has_no_bad_rows(data_dir):
    t = load_tables(data_dir)
    assert (len(t.drugs), len(t.cell_ids), len(t.responses), len(t.bad_rows)) == (20, 60, 1200, 0)


def test_bad_rows_are_dropped_with_reasons(data_dir):
    resp = data_dir / "responses.csv.gz"

    def edit(rows):
        header, body = rows[0], rows[1:]
        body[0][2] = "not-a-number"          # line 2
        body[1][2] = ""                      # line 3
        body[2][0] = "999999999"             # line 4: unknown cell
        body[3][1] = "424242"                # line 5: unknown drug
        body.append(list(body[10]))          # duplicate pair, last line
        body[5][2] = "inf"                   # line 7
        return [header] + body
    rewrite(resp, edit)
    rewrite(data_dir / "drugs.csv", lambda rows: rows[:-1] + [rows[-1][:3] + ["C1CC(("]])
    t = load_tables(data_dir)
    reasons = {(b.file, b.line): b.reason for b in t.bad_rows}
    assert reasons[("responses.csv.gz", 2)] == "missing or non-numeric ln_ic50"
    assert reasons[("responses.csv.gz", 3)] == "missing or non-numeric ln_ic50"
    assert reasons[("responses.csv.gz", 7)] == "missing or non-numeric ln_ic50"
    assert "unknown or unusable cosmic_id" in reasons[("responses.csv.gz", 4)]
    assert "unknown or unusable drug_id" in reasons[("responses.csv.gz", 5)]
    assert reasons[("responses.csv.gz", 1202)] == "duplicate (cosmic_id, drug_id) pair"
    assert "RDKit cannot parse" in reasons[("drugs.csv", 21)]
    assert len(t.drugs) == 19
    # the unparseable drug's 60 pairs go too, each with its reason
    assert len(t.responses) + sum(1 for b in t.bad_rows if b.file == "responses.csv.gz") == 1201


def test_opaque_string_ids_and_empty_names(data_dir):
    """DepMap-style string ids, empty names/tissue/msi, fewer feature columns: all accepted."""
    cells = data_dir / "cell_lines.csv.gz"
    rewrite(cells, lambda rows: [rows[0][:10]] + [["ACH-" + r[0], "", "", ""] + r[4:10] for r in rows[1:]])
    rewrite(data_dir / "responses.csv.gz", lambda rows: rows[:1] + [["ACH-" + r[0], "D" + r[1], r[2]] for r in rows[1:]])
    rewrite(data_dir / "drugs.csv", lambda rows: rows[:1] + [["D" + r[0], ""] + r[2:] for r in rows[1:]])
    t = load_tables(data_dir)
    assert t.cell_features.shape == (60, 6) and len(t.feature_names) == 6
    assert t.cell_ids[0].startswith("ACH-") and t.cell_names[0] == t.cell_ids[0]
    assert len(t.responses) == 1200 and not t.bad_rows


@pytest.mark.parametrize("victim,expect", [
    ("responses.csv.gz", "missing file"),
    ("drugs.csv", "missing file"),
    ("cell_lines.csv.gz", "missing file"),
])
def test_missing_file(data_dir, victim, expect):
    (data_dir / victim).unlink()
    with pytest.raises(DataError, match=f"{expect}.*{victim.split('.')[0]}"):
        load_tables(data_dir)


def test_missing_column(data_dir):
    rewrite(data_dir / "responses.csv.gz", lambda rows: [[c.replace("ln_ic50", "lnIC50") for c in rows[0]]] + rows[1:])
    with pytest.raises(DataError, match="responses.csv.gz: missing column.*ln_ic50"):
        load_tables(data_dir)


def test_cli_error_is_one_line_and_writes_nothing(data_dir, tmp_path):
    (data_dir / "drugs.csv").unlink()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cldr_dist.cli", "shards", "--data", str(data_dir),
                           "--out", str(out), f"data.held_out_drugs={HELD_OUT}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing file" in proc.stderr and "drugs.csv" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_chunked_reading_does_not_change_the_result(data_dir, monkeypatch):
    """load_tables reads responses and cell lines in chunks and finds duplicate pairs with a
    cells x drugs table (or, past MAX_SEEN_TABLE, one key per row): the result and the bad rows
    are the same for any chunk size and either duplicate check, and a kept row costs 12 bytes."""
    from cldr_dist.data import tables as tables_mod

    def edit_responses(rows):
        header, body = rows[0], rows[1:]
        for i in range(0, len(body), 7):
            body[i][2] = ["x", "", "inf", "1e300", "-50", " 3.5 "][i % 6]
        for i in range(3, len(body), 11):
            body[i][0] = ["999", "", body[i][0] + "x"][i % 3]
        body += [list(body[j]) for j in range(0, len(body), 5)] + [list(body[10])] * 20
        return [header] + body

    def edit_cells(rows):
        rows[4][7] = "x"
        rows[5][0] = rows[3][0]
        rows[6][0] = ""
        return rows + [list(rows[9])]
    rewrite(data_dir / "responses.csv.gz", edit_responses)
    rewrite(data_dir / "cell_lines.csv.gz", edit_cells)

    def summary(t):
        return ([(b.file, b.line, b.reason) for b in t.bad_rows], [d.drug_id for d in t.drugs], t.cell_ids,
                t.cell_names, t.cell_features.tobytes(), t.responses["cosmic_id"].tolist(),
                t.responses["drug_id"].tolist(), t.responses["ln_ic50"].tolist())
    default = load_tables(data_dir)
    assert sum(b.reason == "duplicate (cosmic_id, drug_id) pair" for b in default.bad_rows) > 150
    assert default.responses.memory_usage(index=False, deep=True).sum() <= 12 * len(default.responses) + 10_000
    # one-row response chunks, but cell chunks of 20: a cell chunk converts each of its hundreds
    # of feature columns, so one-row cell chunks cost 20 s and meet no case that 3 and 5 rows miss
    for chunk, cell_chunk, seen_table in ((7, 5, tables_mod.MAX_SEEN_TABLE), (50, 3, 0), (1, 20, 0)):
        monkeypatch.setattr(tables_mod, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(tables_mod, "CELL_CHUNK_ROWS", cell_chunk)
        monkeypatch.setattr(tables_mod, "MAX_SEEN_TABLE", seen_table)
        assert summary(load_tables(data_dir)) == summary(default)
