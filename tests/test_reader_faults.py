"""The reader and the numbers under faults (issue 15, defects 6-9).

Each file here is a committed sample with one thing changed at the byte
level (:mod:`cytometry.simulation.fcs_bytes`): the events, one keyword, the
spillover matrix. Every outcome must be a clean one-line error or a result
whose flags say what is wrong, never ``unexpected ...``, a RuntimeWarning or
a silently different count.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from cytometry.analysis import AnalysisOptions, analyze_file
from cytometry.loading.fcs import FcsError, MAX_SPILLOVER_CONDITION, parse_spillover, read_fcs
from cytometry.outputs.cli import main
from cytometry.preprocess import compensate
from cytometry.simulation.fcs_bytes import as_integer_data, split_fcs

VENDOR = Path(__file__).parent / "data" / "vendor"
OPTIONS = AnalysisOptions(beads_per_test=50120, sample_volume_ul=50)


@pytest.fixture(scope="module")
def base(sample_dir):
    return split_fcs((sample_dir / "S01_screening_TBNK.fcs").read_bytes())


@pytest.fixture(scope="module")
def base_result(sample_dir):
    return analyze_file(sample_dir / "S01_screening_TBNK.fcs", options=OPTIONS)


def events_of(parts):
    n = int(parts.get("$PAR"))
    return np.frombuffer(parts.data, dtype="<f4").reshape(-1, n).copy()


def with_events(parts, events):
    return parts.__class__(parts.version, parts.keywords, parts.delimiter,
                           np.ascontiguousarray(events, dtype="<f4").tobytes())


def write(tmp_path, parts, name="edited.fcs"):
    path = tmp_path / name
    path.write_bytes(parts.to_bytes())
    return path


def analyse(path):
    """analyze_file with every warning an error: a RuntimeWarning is a finding too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return analyze_file(path, options=OPTIONS)


def assert_clean(result):
    """Either a result or one foreseen line: never an unexpected exception."""
    if result["status"] == "error":
        assert result["error"] and "\n" not in result["error"]
        assert not result["error"].startswith("unexpected"), result["error"]


def flag_codes(result):
    return {f["code"] for f in result.get("flags", [])}


def spill_with(parts, matrix=None, detectors=None):
    fields = parts.get("$SPILLOVER").split(",")
    n = int(fields[0])
    names = detectors or fields[1:1 + n]
    if matrix is None:
        matrix = np.array([float(v) for v in fields[1 + n:]]).reshape(n, n)
    return parts.with_keywords({"$SPILLOVER": ",".join([str(n)] + list(names)
                                                       + [repr(float(v)) for v in np.ravel(matrix)])})


# --------------------------------------------------------------------------- defect 6

def test_all_zero_events_are_a_clean_error(tmp_path, base):
    result = analyse(write(tmp_path, with_events(base, np.zeros_like(events_of(base)))))
    assert result["status"] == "error" and "no signal" in result["error"]
    assert_clean(result)
    assert result["eligibility"]["verdict"] == "qc_fail"


@pytest.mark.parametrize("kind", ["constant", "random"])
def test_subnormal_events_are_a_clean_error_or_flagged(tmp_path, base, kind):
    events = events_of(base)
    rng = np.random.default_rng(3)
    values = np.full(events.shape, 1e-40) if kind == "constant" else rng.random(events.shape) * 1e-39
    result = analyse(write(tmp_path, with_events(base, values)))
    assert_clean(result)
    assert result["eligibility"]["verdict"] == "qc_fail"  # no signal is never "eligible"


def test_an_empty_singlet_set_is_flagged_not_a_crash(tmp_path, base):
    events = events_of(base)
    events[:, :3] = 0.0  # FSC-A, FSC-H, SSC-A: no event has a scatter signal
    result = analyse(write(tmp_path, with_events(base, events)))
    assert result["status"] == "ok"
    assert "empty_parent" in flag_codes(result)
    assert result["populations"]["b_cells"]["reliable"] is False
    assert result["eligibility"]["verdict"] == "qc_fail"


@pytest.mark.parametrize("top", ["1", "1e300"])
def test_implausible_ranges_on_every_channel(tmp_path, base, base_result, top):
    edited = base.with_keywords({f"$P{i}R": top for i in range(1, 11)})
    result = analyse(write(tmp_path, edited))
    assert_clean(result)
    assert result["status"] == "ok"
    # Without a usable $PnR the default top of scale is used: the counts are the file's.
    assert result["populations"]["b_cells"]["events"] == base_result["populations"]["b_cells"]["events"]
    if top == "1e300":
        assert any("$P8R" in f["message"] and "no plausible top of scale" in f["message"] for f in result["flags"])


@pytest.mark.parametrize("par", ["5", "8"])
def test_par_below_the_named_channels_is_refused(tmp_path, base, par):
    path = write(tmp_path, base.with_keywords({"$PAR": par}))
    with pytest.raises(FcsError, match=r"\$PAR is %s but TEXT names channel 10" % par):
        read_fcs(path)
    result = analyse(path)
    assert result["status"] == "error" and "IndexError" not in result["error"]


# --------------------------------------------------------------------------- defect 7

@pytest.mark.parametrize("gain", ["-1", "0", "nan", "x"])
def test_non_positive_gain_is_refused_naming_the_channel(tmp_path, base, gain):
    path = write(tmp_path, base.with_keywords({"$P8G": gain}))
    with pytest.raises(FcsError) as info:
        read_fcs(path)
    assert "APC-A" in str(info.value) and "$P8G" in str(info.value) and "\n" not in str(info.value)
    result = analyse(path)
    assert result["status"] == "error" and result["eligibility"]["verdict"] == "qc_fail"


def test_a_positive_gain_is_applied_by_flowio(tmp_path, base):
    """flowio divides a channel by its $PnG: the same stored values with gain 2 read as half."""
    plain = read_fcs(write(tmp_path, base, "plain.fcs"))
    gained = read_fcs(write(tmp_path, base.with_keywords({"$P8G": "2"}), "gain2.fcs"))
    column = plain.channel_index("APC-A")
    np.testing.assert_allclose(gained.events[:, column], plain.events[:, column] / 2.0)
    others = [i for i in range(len(plain.pnn)) if i != column]
    np.testing.assert_array_equal(gained.events[:, others], plain.events[:, others])


def test_a_gain_of_2_on_one_channel_does_not_change_the_counts(tmp_path, base, base_result):
    """An instrument that amplified APC-A twice and says so ($P8G 2) gives the same counts."""
    events = events_of(base)
    events[:, 7] *= 2.0
    edited = with_events(base, events).with_keywords({"$P8G": "2"})
    result = analyse(write(tmp_path, edited))
    assert result["status"] == "ok"
    for name, population in base_result["populations"].items():
        assert result["populations"][name]["events"] == population["events"], name
    assert result["eligibility"]["verdict"] == base_result["eligibility"]["verdict"]


@pytest.mark.parametrize("tot", ["20000", "24000"])
def test_tot_disagreeing_with_the_data_is_flagged(tmp_path, base, tot):
    result = analyse(write(tmp_path, base.with_keywords({"$TOT": tot})))
    assert result["status"] == "ok"
    flag = next(f for f in result["flags"] if f["code"] == "event_count_mismatch")
    assert flag["severity"] == "fail" and tot in flag["message"] and "24123" in flag["message"]
    assert result["eligibility"]["verdict"] == "qc_fail"  # not "eligible" on a file that contradicts itself


def test_duplicate_detectors_in_spillover_are_refused(tmp_path, base):
    fields = base.get("$SPILLOVER").split(",")
    n = int(fields[0])
    names = fields[1:1 + n]
    names[1] = names[0]
    with pytest.raises(ValueError, match="twice"):
        parse_spillover(",".join([str(n)] + names + fields[1 + n:]), read_fcs(write(tmp_path, base)).pnn)
    result = analyse(write(tmp_path, spill_with(base, detectors=names)))
    assert {"not_compensated"} <= flag_codes(result)
    assert any("lists detector FITC-A twice" in f["message"] for f in result["flags"])
    assert result["eligibility"]["verdict"] == "qc_fail"


@pytest.mark.parametrize("changes,expected", [
    ({"$P8R": None}, r"channel 8 \(APC-A\) has no \$P8R"),
    ({"$P8R": "x"}, r"channel 8 \(APC-A\) has \$P8R 'x': not a number"),
    ({"$P8E": "x"}, r"channel 8 \(APC-A\) has \$P8E 'x'"),
    ({"$P8E": "4,-1"}, r"channel 8 \(APC-A\) has \$P8E '4,-1'"),
    ({"$DATATYPE": "A"}, r"unsupported \$DATATYPE 'A'"),
])
def test_layout_keywords_flowio_would_misread_are_refused_in_one_line(tmp_path, base, changes, expected):
    with pytest.raises(FcsError, match=expected) as info:
        read_fcs(write(tmp_path, base.with_keywords(changes)))
    assert "\n" not in str(info.value)


def test_a_spaced_byte_order_is_read_in_the_order_it_names(tmp_path, base):
    """flowio compares $BYTEORD verbatim and falls back to the machine's order: wrong numbers, silently."""
    big = base.__class__(base.version, base.with_keywords({"$BYTEORD": "4,3,2,1"}).keywords, base.delimiter,
                         events_of(base).astype(">f4").tobytes())
    plain = read_fcs(write(tmp_path, big, "big.fcs"))
    spaced = read_fcs(write(tmp_path, big.with_keywords({"$BYTEORD": "4, 3, 2, 1"}), "spaced.fcs"))
    np.testing.assert_array_equal(spaced.events, plain.events)
    np.testing.assert_array_equal(plain.events, read_fcs(write(tmp_path, base, "little.fcs")).events)


def test_a_vanishing_gain_is_refused_without_warnings(tmp_path, base):
    """$PnG 1e-300 makes every value 1e300 or more: events beyond any scale, not a RuntimeWarning."""
    result = analyse(write(tmp_path, base.with_keywords({"$P8G": "1e-300"})))
    assert result["status"] == "error" and "beyond" in result["error"]


def test_a_keyword_repeated_with_another_value_is_refused(tmp_path, base):
    parts = base.__class__(base.version, base.keywords + (("$P8G", "-1"),), base.delimiter, base.data)
    with pytest.raises(FcsError, match=r"\$P8G appears twice with different values"):
        read_fcs(write(tmp_path, parts))


# --------------------------------------------------------------------------- defect 8

def _well_conditioned_tiny_determinant(n=6):
    rng = np.random.default_rng(8)
    matrix = 0.005 * (np.eye(n) + 0.05 * rng.random((n, n)) * (1 - np.eye(n)))
    assert abs(np.linalg.det(matrix)) < 1e-12 and np.linalg.cond(matrix) < 2
    return matrix


def test_a_well_conditioned_matrix_with_a_tiny_determinant_is_accepted(tmp_path, base):
    matrix = _well_conditioned_tiny_determinant()
    sample = read_fcs(write(tmp_path, spill_with(base, matrix)))
    assert sample.spillover is not None
    compensated = compensate(sample.events, sample.pnn, sample.spillover)
    columns = [sample.pnn.index(d) for d in sample.spillover.detectors]
    expected = np.linalg.solve(matrix.T, sample.events[:, columns].T).T
    # compensated events are stored in the data's float32 (bounded memory, issue 15 defect 10): agreement to
    # float32 rounding, i.e. a couple of its machine epsilons relative
    assert compensated.dtype == np.float32
    np.testing.assert_allclose(compensated[:, columns], expected, rtol=2 * np.finfo(np.float32).eps, atol=1e-6)


def test_an_ill_conditioned_matrix_is_refused(tmp_path, base):
    matrix = np.eye(6)
    matrix[0, 1], matrix[1, 0] = 1.0, 1.0 - 5e-10  # condition number about 8e9, determinant 5e-10
    assert np.linalg.cond(matrix) > MAX_SPILLOVER_CONDITION
    pnn = read_fcs(write(tmp_path, base)).pnn
    text = spill_with(base, matrix).get("$SPILLOVER")
    with pytest.raises(ValueError, match="condition number"):
        parse_spillover(text, pnn)
    result = analyse(write(tmp_path, spill_with(base, matrix)))
    assert "not_compensated" in flag_codes(result)
    assert result["eligibility"]["verdict"] == "qc_fail"


def test_a_huge_spillover_entry_is_refused_without_warnings(tmp_path, base):
    matrix = np.eye(6)
    matrix[0, 1] = 1e308
    result = analyse(write(tmp_path, spill_with(base, matrix)))  # warnings are errors in analyse()
    assert result["status"] == "ok", result["error"]
    assert "not_compensated" in flag_codes(result)
    assert result["eligibility"]["verdict"] == "qc_fail"


def test_the_cli_says_nothing_on_stderr_for_a_huge_entry(tmp_path, base, capsys):
    matrix = np.eye(6)
    matrix[0, 1] = 1e308
    path = write(tmp_path, spill_with(base, matrix))
    main(["analyze", str(path), "--json", "--beads-per-test", "50120", "--sample-volume-ul", "50", "--workers", "1"])
    captured = capsys.readouterr()
    assert "RuntimeWarning" not in captured.err and "Traceback" not in captured.err
    sample = json.loads(captured.out)["samples"][0]
    assert sample["status"] == "ok" and "histogram" not in (sample["error"] or "")


# --------------------------------------------------------------------------- defect 9

def test_cytek_xp5_24_bit_data_load_with_fcsparsers_values():
    sample = read_fcs(VENDOR / "Cytek_xP5.fcs")
    assert sample.events.shape == (23126, 8)
    # fcsparser's own test gives the first two events' channel values; channels 4-8
    # are log-amplified ($PnE 4,1 over $PnR 1024), which flowio converts to linear.
    channel_values = np.array([[0., 286., 164., 154., 54., 470., 1023., 770.],
                               [0., 171., 128., 153., 199., 91., 211., 12.]])
    expected = channel_values.copy()
    expected[:, 3:] = 10 ** (4.0 * channel_values[:, 3:] / 1024.0)
    expected[:, 0] *= float(sample.keywords["timestep"])
    np.testing.assert_allclose(sample.events[:2], expected, rtol=1e-6)


@pytest.mark.parametrize("big_endian", [False, True])
def test_24_bit_integer_data_read_as_the_same_numbers_in_32_bits(tmp_path, base, big_endian):
    wide = read_fcs(write(tmp_path, as_integer_data(base, 32), "i32.fcs"))
    narrow = read_fcs(write(tmp_path, as_integer_data(base, 24, big_endian), "i24.fcs"))
    np.testing.assert_array_equal(narrow.events, wide.events)
    assert narrow.events.shape == (24123, 10) and any("24-bit" in note for note in narrow.read_notes)


def test_blank_header_data_offsets_load_with_fcsparsers_values():
    sample = read_fcs(VENDOR / "fake_large_fcs.fcs")
    assert sample.events.shape == (11585, 11)
    expected = np.array([[1.31284998e+03, 5.60000000e+02, 1.53640969e+05, 1.47263989e+03, 1.42400000e+03,
                          6.77745312e+04, 1.79399986e+01, 8.57999992e+00, 1.37059998e+02, -3.67200012e+01, 0.0],
                         [9.15529968e+02, 2.97000000e+02, 2.02020781e+05, 3.24479980e+02, 3.49000000e+02,
                          6.09315781e+04, 2.33999996e+01, 7.79999971e+00, 1.65550003e+02, 2.01599998e+01, 0.0]])
    np.testing.assert_allclose(sample.events[:2], expected, rtol=1e-6)
    assert any("blank" in note for note in sample.read_notes)


@pytest.mark.parametrize("name", ["Cytek_xP5.fcs", "fake_large_fcs.fcs"])
def test_vendor_files_go_through_analyze_as_one_line(name, capsys):
    # Neither tube is a TBNK or CAR panel: the answer is the panel error, not a reading error.
    main(["analyze", str(VENDOR / name), "--json", "--workers", "1"])
    captured = capsys.readouterr()
    sample = json.loads(captured.out)["samples"][0]
    assert sample["status"] == "error" and "cannot be read" not in sample["error"]
    assert not sample["error"].startswith("unexpected") and "Traceback" not in captured.err
